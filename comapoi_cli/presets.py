"""Dataset presets: what comapoi knows about the CoMaPOI check-in datasets.

Any dataset name works (``--dataset mycity``); a preset only adds facts such as the POI id range
used to validate candidate lists, and the city that ``comapoi data synth`` simulates (its
bounding box, years, category names as the source data spells them, and how many decimals its
coordinates carry).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The preset of a dataset name (case-insensitive), or None for a dataset comapoi does not know."""
    if not dataset:
        return None
    return PRESETS.get(dataset.lower())
