"""Converters from the official dataset formats (and the synthetic generator) to the project's WebDataset shards.

Each module has a function (convert_coda_lm, convert_drivelm, generate_synthetic) and an argparse `main(argv)`.
"""
