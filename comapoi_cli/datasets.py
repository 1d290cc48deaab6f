"""Dataset presets: what comapoi knows about the CoMaPOI check-in datasets.

Any dataset name works (``--dataset mycity``); a preset only adds facts such as the POI id range
used to validate candidate lists, and the city that ``comapoi data synth`` simulates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    description: str
    max_poi_id: int  # POI ids are 0-based integers in 0..max_poi_id
    train_trajectories: int
    test_trajectories: int
    # bounding box of the city: (lat_min, lat_max, lon_min, lon_max)
    bbox: tuple[float, float, float, float]
    years: tuple[int, ...]


PRESETS: dict[str, DatasetPreset] = {
    "nyc": DatasetPreset("nyc", "Foursquare New York City, 2012-2013", 5091, 3870, 988,
                         (40.55, 40.99, -74.27, -73.68), (2012, 2013)),
    "tky": DatasetPreset("tky", "Foursquare Tokyo, 2012-2013", 7851, 11850, 2206,
                         (35.51, 35.87, 139.47, 139.91), (2012, 2013)),
    "ca": DatasetPreset("ca", "Gowalla California, 2009-2010", 13630, 6616, 1818,
                        (32.5, 42.0, -124.4, -114.1), (2009, 2010)),
}


def preset_for(dataset: str | None) -> DatasetPreset | None:
    """The preset of a dataset name (case-insensitive), or None for a dataset comapoi does not know."""
    if not dataset:
        return None
    return PRESETS.get(dataset.lower())
