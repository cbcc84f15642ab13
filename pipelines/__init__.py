"""End-to-end jobs, one module each; every module has `run(argv)`."""
