"""One module per stage; each runs as `python -m jobs.<stage> --config FILE.yaml`."""
