from capsrun.cli import main

main()
