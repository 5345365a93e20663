from bench.train.cli import main

main()
