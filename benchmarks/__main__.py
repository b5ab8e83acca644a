"""`python -m benchmarks`: the whole benchmark run; `--help` lists the options."""

from benchmarks.run import main

main()
