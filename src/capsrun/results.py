"""The measured runs are data: ``results/*.csv``, one row per run (date, device, torch, threads,
seed, command, minutes and its figures). The tables of the README and docs/performance.md are
rendered from those rows, between markers ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``,
so the prose cannot drift from the data:

    python -m capsrun.results README.md docs/performance.md           # rewrite the tables
    python -m capsrun.results --check README.md docs/performance.md   # exit 1 if one is stale

(``make results``). A new measurement is a new row; the tables follow.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable
from pathlib import Path

Row = dict[str, str]

# the published figure each CapsNet-paper reproduction is read against (the capsule RBM's table says
# its own in prose: arXiv:1907.11643 publishes none)
PUBLISHED = {
    "capsnet_mnist": "99.75 %",
    "capsnet_fashion_mnist": "- (a Keras port: 93.62 %)",
    "baseline_cnn_mnist": "99.61 %",
    "capsnet_affnist": "99.23 % (affNIST: 79 %)",
    "capsnet_multimnist": "94.8 %",
    "baseline_cnn_multimnist": "91.9 %",
}
TITLES = {
    "capsnet_mnist": "CapsNet, MNIST",
    "capsnet_fashion_mnist": "CapsNet, Fashion-MNIST",
    "baseline_cnn_mnist": "baseline CNN, MNIST",
    "capsnet_affnist": "CapsNet, affNIST protocol",
    "capsnet_multimnist": "CapsNet, MultiMNIST",
    "baseline_cnn_multimnist": "baseline CNN, MultiMNIST",
    "vcaps_mnist": "VCaps, MNIST",
    "vcaps_fashion_mnist": "VCaps, Fashion-MNIST",
    "capsrbm_mnist": "capsule RBM",
    "capsrbm_gated": "gated RBM (the capsule RBM before routing)",
    "capsrbm_gated_tapered": "gated RBM, tapered ladder",
    "rbm_mnist": "RBM anchor",
    "real_digits": "1,000 real binarised test digits",
}


def load(folder: Path, name: str) -> list[Row]:
    """The rows of ``folder/name`` (a CSV with a header), as read: strings."""
    with open(folder / name, newline="") as f:
        return list(csv.DictReader(f))


def table(rows: list[Row], columns: list[tuple[str, Callable[[Row], str]]]) -> str:
    """A Markdown table: one row per ``rows`` entry, one column per ``(header, cell of a row)``."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r).replace("|", "\\|") for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def _cmd(r: Row) -> str:
    return f"`{r['command']}`" if r["command"].startswith("capsrun") else r["command"]


def _device(r: Row) -> str:
    return r["device"] + (f", {r['threads']} threads" if r.get("threads") else "") + f", torch {r['torch']}"


def _minutes(r: Row) -> str:
    return f"{r['minutes']} min" if r.get("minutes") else "-"


def capsnet(folder: Path) -> str:
    """The CapsNet family on the paper's protocols, and variational capsules."""
    runs = load(folder, "capsnet.csv")
    out = table(
        runs,
        [
            ("reproduction", lambda r: TITLES[r["reproduction"]]),
            ("command", _cmd),
            ("device", lambda r: r["device"].split(" (")[0]),
            ("ours: final (best)", lambda r: f"{r['test_accuracy']} % ({r['best_test_accuracy']} %)"),
            ("published", lambda r: PUBLISHED[r["reproduction"]]),
        ],
    )
    vcaps = table(
        load(folder, "vcaps.csv"),
        [
            ("reproduction", lambda r: TITLES[r["reproduction"]]),
            ("command", _cmd),
            ("test accuracy", lambda r: f"{r['test_accuracy']} %"),
            ("samples recognised", lambda r: f"{r['samples_recognised']} %"),
            ("Frechet distance", lambda r: r["frechet_distance"]),
        ],
    )
    data = "Data: [results/capsnet.csv](results/capsnet.csv)."
    return f"{out}\n\n{data}\n\n{vcaps}\n\nData: [results/vcaps.csv](results/vcaps.csv)."


# the day each recipe of conf/experiment/ took its present form: the README shows its runs since
RECIPE_SINCE = {
    "capsrbm_mnist": "2026-12-07",
    "capsrbm_gated": "2026-12-05",
    "rbm_mnist": "2026-12-05",
}


def _current(rows: list[Row], reproductions: tuple[str, ...]) -> list[Row]:
    """The rows of each of ``reproductions`` measured on its present recipe (:data:`RECIPE_SINCE`)."""
    return [r for p in reproductions for r in rows if r["reproduction"] == p and r["date"] >= RECIPE_SINCE[p]]


def _look(looks: list[Row], checkpoint: str, sweeps: str) -> str:
    """``recognised / class range / Frechet distance`` of the first look at ``sweeps`` sweeps."""
    found = [r for r in looks if r["checkpoint"] == checkpoint and r["sweeps"] == sweeps]
    if not found:
        return "-"
    r = found[0]
    return f"{r['recognised']} % / {r['class_min']}-{r['class_max']} % / {r['frechet_distance']}"


def _real(r: Row, sweeps: int) -> str:
    """Real digits' figures, what a look is read against: shown once (they have no sweeps)."""
    return (
        f"{r['recognised']} % / {r['class_min']}-{r['class_max']} % / {r['frechet_distance']}" if sweeps == 1000 else ""
    )


def capsrbm(folder: Path) -> str:
    """The RBM anchor as trained today: each run's AIS test log-likelihood and the looks of its
    samples from noise after 1,000, 1,500 and 2,000 sweeps (all earlier runs and looks, the gated
    RBM's among them, are rows of the same files)."""
    looks = load(folder, "capsrbm_samples.csv")
    runs = _current(load(folder, "capsrbm.csv"), ("rbm_mnist",))
    runs += [
        {**r, "seed": "", "minutes": "", "test_log_likelihood": ""} for r in looks if r["reproduction"] == "real_digits"
    ]

    def name(r: Row) -> str:
        return f"{r['reproduction']} seed {r['seed']}, {r['date']}" if r["seed"] else r["checkpoint"]

    columns = [
        ("run", lambda r: TITLES[r["reproduction"]] + (f", seed {r['seed']}" if r["seed"] else "")),
        ("date, device", lambda r: f"{r['date']}, {r['device'].removeprefix('CPU: ')}" if r["seed"] else ""),
        ("training", _minutes),
        ("AIS test log-likelihood", lambda r: f"{r['test_log_likelihood']} nats" if r["test_log_likelihood"] else "-"),
        *[(f"{n:,} sweeps", lambda r, n=n: _look(looks, name(r), str(n)) if r["seed"] else _real(r, n))
          for n in (1000, 1500, 2000)],
    ]  # fmt: skip
    words = (
        "Training: `capsrun train experiment=<name> seed=<seed> eval_classifier=<judge>` (torch and threads in "
        "the data); samples: `capsrun sample checkpoint=<run>/checkpoints/best.pt sampler.chains=1000 "
        "judge_every=500 eval_classifier=<judge> seed=1`, 1,000 chains from noise on the default sampler; "
        "recognised / every class within / Frechet distance. Published for scale: an RBM of 500 hidden "
        "units, -86.34 nats (CD-25, Salakhutdinov & Murray 2008); arXiv:1907.11643 reports no likelihood. "
        "Data: [results/capsrbm.csv](results/capsrbm.csv), [results/capsrbm_samples.csv](results/capsrbm_samples.csv)."
    )
    return f"{table(runs, columns)}\n\n{words}"


def capsrbm_routing(folder: Path) -> str:
    """The capsule RBM by routing iterations (mean-field passes) and seed: training time, test
    log-likelihood (its kind and spread), the judged samples from noise and the couplings' entropy.
    The rows of the one-group model (``capsrbm_one_group``) stay in the CSV, not in the table."""
    rows = _current(load(folder, "capsrbm_routing.csv"), ("capsrbm_mnist",))
    rows.sort(key=lambda r: (int(r["routing_iterations"]), int(r["seed"])))
    columns = [
        ("routing.iterations", lambda r: r["routing_iterations"]),
        ("seed", lambda r: r["seed"]),
        ("training", _minutes),
        ("test log-likelihood", lambda r: f"{r['test_log_likelihood']} nats ({r['log_likelihood_kind']}, "
                                          f"spread {r['ll_spread']}; AIS std {r['ais_log_w_std']})"),
        ("samples: recognised / every class within / Frechet",
         lambda r: f"{r['recognised']} % / {r['class_min']}-{r['class_max']} % / {r['frechet_distance']}"),
        ("coupling entropy (routing std)", lambda r: f"{r['coupling_entropy']} ({r['routing_std']})"),
    ]  # fmt: skip
    first = rows[0] if rows else {"device": "-", "torch": "-", "threads": "-", "date": "-"}
    words = (
        "`capsrun train -m experiment=capsrbm_mnist seed=0,1 routing.iterations=1,2,3 eval_classifier=<judge>` "
        f"on {first['device'].removeprefix('CPU: ')}, torch {first['torch']}, "
        f"{first['threads']} threads, {first['date']}. "
        "Log-likelihood: importance sampling over the routes (100 samples a test image; spread: the std of "
        "their log weights) and AIS log Z of the joint (50 runs x 10,000 temperatures); samples: the run's judged "
        "grid, 100 chains from noise after 1,500 sweeps; coupling entropy: `hidden_caps/coupling/entropy` of "
        "`capsrun analyze` on 1,000 test digits of `best.pt` (per patch and group, 1 = uniform), routing std how "
        "much the couplings move between images; 5 groups of 10 capsules (the one-group rows of 2026-12-06 are in "
        "the CSV as `capsrbm_one_group`). Data: [results/capsrbm_routing.csv](results/capsrbm_routing.csv)."
    )
    return f"{table(rows, columns)}\n\n{words}"


def bench(folder: Path, name: str) -> str:
    """One ``capsrun bench`` CSV as the table it printed."""
    rows = load(folder, name)
    columns = [
        ("model", lambda r: r["model"] + (" (reference)" if r["train_x_ref"] == "1.00" else "")),
        ("routing", lambda r: r["routing"]),
        ("batch", lambda r: r["batch"]),
        ("precision", lambda r: r["precision"]),
        ("compile", lambda r: r["compile"]),
        ("channels-last", lambda r: r["channels_last"]),
        ("train img/s", lambda r: f"{float(r['train_images_per_s']):,.3g}" if float(r["train_images_per_s"]) < 1000
         else f"{float(r['train_images_per_s']):,.0f}"),
        ("x ref", lambda r: r["train_x_ref"]),
        ("eval img/s", lambda r: f"{float(r['eval_images_per_s']):,.3g}" if float(r["eval_images_per_s"]) < 1000
         else f"{float(r['eval_images_per_s']):,.0f}"),
        ("x ref", lambda r: r["eval_x_ref"]),
        ("peak MiB", lambda r: f"{int(r['peak_mib']):,}" if r["peak_mib"] else "-"),
    ]  # fmt: skip
    commands = list(dict.fromkeys(r["command"] for r in rows))
    said = "; ".join(f"`{c}`" for c in commands)
    data = f"Data: [results/{name}](../results/{name})."
    return f"{said} ({rows[0]['date']}, {_device(rows[0])}):\n\n{table(rows, columns)}\n\n{data}"


def bench_energy(folder: Path) -> str:
    """The energy models' training step, by ladder and chains (each row's command in the CSV)."""
    rows = load(folder, "bench-energy.csv")
    columns = [
        ("date", lambda r: r["date"]),
        ("device", lambda r: r["device"]),
        ("model", lambda r: r["model"]),
        ("setting", lambda r: r["setting"]),
        ("train img/s", lambda r: f"{int(r['train_images_per_s']):,}"),
        ("eval img/s", lambda r: f"{int(r['eval_images_per_s']):,}" if r["eval_images_per_s"] else "-"),
    ]
    data = "Data, with each row's `capsrun bench` command: [results/bench-energy.csv](../results/bench-energy.csv)."
    return f"{table(rows, columns)}\n\n{data}"


def health(folder: Path) -> str:
    """Capsule health by depth (arXiv:2301.01583's starving capsules, measured)."""
    return table(
        load(folder, "deep_capsnet.csv"),
        [
            ("depth", lambda r: re.search(r"model.depth=(\d+)", r["command"]).group(1)),
            ("test accuracy", lambda r: f"{r['test_accuracy']} %"),
            ("conv1 grad norm", lambda r: r["conv1_grad_norm"]),
            ("first hidden layer grad", lambda r: r["first_hidden_grad_norm"] or "-"),
            ("constant share, % (each hidden layer)", lambda r: r["hidden_constant_share"] or "-"),
            ("routing std (class caps)", lambda r: r["routing_std"]),
            ("predictions unchanged by T", lambda r: f"{r['affine_agreement']} %"),
        ],
    )  # fmt: skip


SECTIONS: dict[str, Callable[[Path], str]] = {
    "capsnet": capsnet,
    "capsrbm": capsrbm,
    "capsrbm-routing": capsrbm_routing,
    "health": health,
    "bench-cpu": lambda folder: bench(folder, "bench-cpu-epyc-avx512-2threads-pt2.14.1.csv"),
    "bench-h200": lambda folder: bench(folder, "bench-h200-pt2.11.0.csv"),
    "bench-energy": bench_energy,
}
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(?:.*?\n)?(<!-- /results:\2 -->)", re.S)


def render(text: str, folder: Path) -> str:
    """``text`` with every results block rendered anew from the CSVs in ``folder``."""

    def fill(m: re.Match) -> str:
        if m.group(2) not in SECTIONS:
            raise KeyError(f"unknown results block {m.group(2)!r}; known: {', '.join(SECTIONS)}")
        return m.group(1) + SECTIONS[m.group(2)](folder) + "\n" + m.group(3)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capsrun.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the folder of CSVs (./results)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is stale")
    args = parser.parse_args(argv)
    stale = []
    for doc in args.documents:
        text = doc.read_text()
        fresh = render(text, args.results)
        if fresh != text:
            stale.append(str(doc))
            if not args.check:
                doc.write_text(fresh)
    if args.check and stale:
        print(f"stale results tables in {', '.join(stale)}: run python -m capsrun.results {' '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
