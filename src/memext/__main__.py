from memext.cli import main

main()
