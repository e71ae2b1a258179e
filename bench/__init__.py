"""The benchmark, reliability and fuzz runners: start servers on loopback, drive them with
the load generator (`loadtest`), and write BENCHMARKS.md and RELIABILITY.md from one run."""
