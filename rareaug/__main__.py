from rareaug.cli import main

main()
