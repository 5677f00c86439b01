"""Command-line helpers that train.py, pretrain.py and bench.py share (and the tests): the help formatter, range-
checked number types for argparse, a free port, and the environment of a world of one. Standard library only."""
import argparse
import math
import os
import socket


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's line breaks and shows every flag's default."""


def number(kind, lo=-math.inf, hi=math.inf, above=False, auto=False):
    """An argparse type: kind(text) in [lo, hi] (lo < x with above), or "auto" where auto is allowed; out of range,
    argparse reports "argument --flag: TEXT: must be >= LO ..." in one line."""
    def parse(text):
        if auto and text == "auto":
            return text
        x = kind(text)
        if x > hi or (x <= lo if above else x < lo):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if above else '>='} {lo:g}" +
                                              (f" and <= {hi:g}" if hi < math.inf else "") + (" (or auto)" * auto))
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_of_one():
    """The variables torchrun would set, for a plain `python script.py`: rank 0 of 1, on a free local port (a
    fixed one could be held by another run). Variables already set win."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        os.environ.setdefault(k, v)
