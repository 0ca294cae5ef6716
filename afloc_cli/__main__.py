from afloc_cli.cli import main

main()
