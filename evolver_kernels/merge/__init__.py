"""`python -m evolver_kernels.merge`: one-shot merges of model directories. cli (the command and its flags),
config (mergekit YAML read into a MergeSpec), plan (which tensor comes from where), run (the merge itself)."""


def main(argv: list[str] | None = None) -> int:
    """The command's entry point (console script `evolver-merge`)."""
    from evolver_kernels.merge.cli import main as cli_main

    return cli_main(argv)
