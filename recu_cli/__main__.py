from recu_cli.cli import main

main()
