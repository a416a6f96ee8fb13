"""Every DP release by name, in the one order a hospital measures them (its noise draws repeat)."""

from __future__ import annotations

from collections.abc import Iterable

from models.releases.base import Release, ReleaseError
from models.releases.counts import HISTOGRAM_RELEASE, HISTOGRAMS, PAIR_RELEASE, PAIRS
from models.releases.numeric import NumericMomentsRelease
from models.releases.sequence import SequenceMomentsRelease

# Measured in this order: the numeric moments standardise with the histograms released before.
RELEASES: tuple[Release, ...] = (
    HISTOGRAM_RELEASE,
    PAIR_RELEASE,
    NumericMomentsRelease(),
    SequenceMomentsRelease(),
)
RELEASE_NAMES = tuple(release.name for release in RELEASES)
# The server always needs these: the histograms build the encoder, the pair tables are SA-DQC's
# categorical reference.
ALWAYS_RELEASED = (HISTOGRAMS, PAIRS)


def releases_for(names: Iterable[str]) -> list[Release]:
    """The releases named (plus those always made), in catalogue order; unknown names are an error."""
    wanted = {*ALWAYS_RELEASED, *names}
    unknown = sorted(wanted - set(RELEASE_NAMES))
    if unknown:
        raise ReleaseError(f"unknown DP release(s) {unknown}; known: {list(RELEASE_NAMES)}")
    return [release for release in RELEASES if release.name in wanted]


def get_release(name: str) -> Release:
    """The release called `name`."""
    return next(release for release in releases_for([name]) if release.name == name)
