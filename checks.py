"""Start-up checks of the flags themselves, before anything is loaded or written: a setting that
would be silently ignored, or that cannot work, is one line naming the flag.

Ground floor: imports nothing of this project (Settings is read through dataclasses)."""
import dataclasses


class FlagError(ValueError):
    """A bad flag or combination of flags. The message is one line and names the flag."""


SPPO_LOSSES = ("sppo", "sppo_single")


def _default(s, name):
    return {f.name: f.default for f in dataclasses.fields(s)}[name]


def check_flags(s):
    """Raise FlagError for flags that the chosen loss would ignore: the SPPO losses' strength is
    --eta (eta = 1/beta in the paper), DPO's and IPO's is --beta; a non-default value of the other
    one would change nothing, and whoever set it believes otherwise."""
    if s.loss in SPPO_LOSSES and s.beta != _default(s, "beta"):
        raise FlagError(f"--beta is not used by --loss {s.loss} (its strength is --eta)")
    if s.loss not in SPPO_LOSSES and s.eta != _default(s, "eta"):
        raise FlagError(f"--eta is not used by --loss {s.loss} (its strength is --beta)")
