"""Speed, memory and quality harness: `python -m benchmarks --help`. Prints tables; never run as tests."""
