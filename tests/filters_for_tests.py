"""User filters (`python:tests.filters_for_tests:NAME`) that the tests plug into runs."""


def every_other(outputs, prompts):
    """Keep the first, third, ... candidate of each call (True = keep)."""
    return [i % 2 == 0 for i in range(len(prompts))]


def one_too_few(outputs, prompts):
    """A broken filter: one verdict short."""
    return [True] * (len(prompts) - 1)
