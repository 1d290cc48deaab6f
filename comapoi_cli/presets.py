"""Dataset presets: what comapoi knows about the CoMaPOI check-in datasets.

Any dataset name works (``--dataset mycity``); a preset only adds facts such as the POI id range
used to validate candidate lists, and the city that ``comapoi data synth`` simulates (its
bounding box, years, category names as the source data spells them, and how many decimals its
coordinates carry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

# Foursquare category names as they appear in the NYC and TKY check-ins (quirks included:
# "Ramen /  Noodle House" has two spaces, "Café" is UTF-8).
_FOURSQUARE_COMMON = (
    "Train Station", "Subway", "Bus Station", "Coffee Shop", "Café", "Bar", "Home (private)", "Office",
    "Gym / Fitness Center", "Food & Drink Shop", "Convenience Store", "Department Store", "Plaza",
    "Park", "Neighborhood", "Road", "University", "College Academic Building", "Electronics Store",
    "Clothing Store", "Mall", "Bookstore", "Hotel", "Airport", "Movie Theater", "Music Venue",
    "Hospital", "Medical Center", "Building", "Church", "Grocery Store", "Fast Food Restaurant",
    "Sandwich Place", "Bakery", "Pizza Place", "Burger Joint", "Chinese Restaurant",
    "Italian Restaurant", "Sushi Restaurant", "Stadium", "Arcade", "Salon / Barbershop",
)
_NYC_EXTRA = ("American Restaurant", "Deli / Bodega", "Ferry", "Bridge", "Beach", "Mexican Restaurant",
              "Other Great Outdoors", "Residential Building (Apartment / Condo)", "Bagel Shop", "Diner")
_TKY_EXTRA = ("Japanese Restaurant", "Ramen /  Noodle House", "Toy / Game Store", "Miscellaneous Shop",
              "Drugstore / Pharmacy", "Bowling Alley", "Shrine", "Temple", "Tea Room", "Karaoke Box")
# Gowalla (CA) spots mix categories and brand names.
_GOWALLA = (
    "Apartment", "Home", "Office", "Coffee Shop", "Starbucks", "Other - Nightlife", "Dive Bar",
    "Lounge", "Fine Dining", "Burgers", "Mexican", "Chipotle", "Asian", "Pizza", "Breakfast",
    "Other - Food ", "Grocery", "Target", "Walmart", "Shopping Mall", "Campus Spot", "Library",
    "Park", "Theatre", "Movie Theatre", "Stadium", "Gym", "Hotel", "Airport", "Train Station",
    "Gas & Automotive", "Church", "Hospital", "Beach", "Trail", "Vineyard", "Sushi", "Deli",
)


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
    categories: tuple[str, ...] = _FOURSQUARE_COMMON
    coord_decimals: int = 8          # digits after the point, as the source data writes them
    neighbourhoods: int = 40         # activity clusters the simulated city has

    @property
    def users(self) -> int:
        """One test trajectory per user in the original data."""
        return self.test_trajectories


PRESETS: dict[str, DatasetPreset] = {
    "nyc": DatasetPreset("nyc", "Foursquare New York City, 2012-2013", 5091, 3870, 988,
                         (40.55, 40.99, -74.27, -73.68), (2012, 2013),
                         _FOURSQUARE_COMMON + _NYC_EXTRA, 8, 45),
    "tky": DatasetPreset("tky", "Foursquare Tokyo, 2012-2013", 7851, 11850, 2206,
                         (35.51, 35.87, 139.47, 139.91), (2012, 2013),
                         _FOURSQUARE_COMMON + _TKY_EXTRA, 7, 60),
    "ca": DatasetPreset("ca", "Gowalla California, 2009-2010", 13630, 6616, 1818,
                        (32.5, 42.0, -124.4, -114.1), (2009, 2010),
                        _GOWALLA, 10, 80),
}


def preset_for(dataset: str | None) -> DatasetPreset | None:
    """The preset of a dataset name (case-insensitive), or None for a dataset comapoi does not know.

    Besides the built-in presets, a city recorded by ``comapoi data prepare`` (see ``prepared_preset``)."""
    if not dataset:
        return None
    return PRESETS.get(dataset.lower()) or prepared_preset(dataset)


def require_preset(dataset: str | None, needed_by: str) -> DatasetPreset:
    """The preset of ``dataset``; a name comapoi does not know is one sentence (``UsageError``) saying that
    ``needed_by`` ("the chain", "the build") needs its POI id range."""
    from comapoi_cli.errors import UsageError

    preset = preset_for(dataset)
    if preset is None:
        raise UsageError(f"Unknown dataset '{dataset}'; {needed_by} needs its POI id range (nyc, tky, ca).")
    return preset


# -- datasets prepared by ``comapoi data prepare`` ----------------------------------------------------------
#: Where ``comapoi data prepare`` records a new city so that train, eval and pipeline know it by name:
#: ``$COMAPOI_DATASETS_DIR/{name}.json`` (default ``$XDG_CONFIG_HOME/comapoi/datasets``, else
#: ``~/.config/comapoi/datasets``). A ``{data_dir}/{name}/dataset.json`` beside the prepared files
#: (``$COMAPOI_DATA_DIR`` or ``./data``) is found too.
DATASETS_ENV = "COMAPOI_DATASETS_DIR"


def datasets_dir() -> Path:
    import os
    from pathlib import Path

    if os.environ.get(DATASETS_ENV):
        return Path(os.environ[DATASETS_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "comapoi" / "datasets"


def _from_record(data: dict) -> DatasetPreset | None:
    try:
        bbox = tuple(float(x) for x in data["bbox"])
        return DatasetPreset(str(data["name"]), str(data.get("description") or ""), int(data["max_poi_id"]),
                             int(data.get("train_trajectories") or 0), int(data.get("test_trajectories") or 0),
                             (bbox[0], bbox[1], bbox[2], bbox[3]), tuple(int(y) for y in data.get("years") or ()),
                             tuple(str(c) for c in data.get("categories") or ()) or _FOURSQUARE_COMMON,
                             int(data.get("coord_decimals", 8)))
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def prepared_preset(dataset: str) -> DatasetPreset | None:
    """The preset ``comapoi data prepare`` recorded for a new city, or None."""
    import json
    import os
    from pathlib import Path

    name = dataset.lower()
    if not name or "/" in name or name.startswith("."):
        return None
    candidates = [datasets_dir() / f"{name}.json",
                  Path(os.environ.get("COMAPOI_DATA_DIR") or "data") / dataset / "dataset.json"]
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("name", "")).lower() == name:
            preset = _from_record(data)
            if preset is not None:
                return preset
    return None


def register_dataset(record: dict, source: Path) -> Path:
    """Record a prepared city (``dataset.json``'s content) so that ``preset_for(name)`` finds it."""
    import json

    from comapoi_cli.fileio import write_text_atomic

    target = datasets_dir() / f"{str(record['name']).lower()}.json"
    write_text_atomic(target, json.dumps({**record, "source": str(source.resolve())}, indent=2, ensure_ascii=False) + "\n")
    return target
