from vqcli.cli import main

main()
