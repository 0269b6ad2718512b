"""Travel: pick a flight and a hotel, then book both — the accumulator pattern.

Each selection is remembered in the session; `book_trip` refuses until both
are chosen, then books the trip and clears the selections for the next one.
A refusal is raised as `ToolError`, so the model reads the reason: mcp reports
any other exception only as "Error executing tool X".
"""

from mcp.server.mcpserver.exceptions import ToolError

from concierge import Concierge

app = Concierge(
    "travel",
    instructions=(
        "A travel desk. Look at the options, select a flight and a hotel, then book the trip. "
        "Selections are remembered between calls; selecting again replaces the earlier choice."
    ),
)

FLIGHTS = {
    "AF123": {"from": "CDG", "to": "JFK", "departs": "2026-09-14T10:30", "price": 540.0},
    "BA117": {"from": "LHR", "to": "JFK", "departs": "2026-09-14T08:20", "price": 495.0},
    "LH400": {"from": "FRA", "to": "JFK", "departs": "2026-09-14T10:05", "price": 610.0},
}

HOTELS = {
    "hudson": {"name": "The Hudson", "city": "New York", "per_night": 210.0},
    "pod51": {"name": "Pod 51", "city": "New York", "per_night": 120.0},
    "plaza": {"name": "The Plaza", "city": "New York", "per_night": 780.0},
}


def _selection() -> dict:
    """The trip chosen so far in this session, with catalogue details."""
    flight_id = app.get_state("flight")
    hotel = app.get_state("hotel")
    return {
        "flight": None if flight_id is None else {"id": flight_id, **FLIGHTS[flight_id]},
        "hotel": None if hotel is None else {**hotel, **HOTELS[hotel["id"]]},
    }


@app.tool()
def list_options() -> dict:
    """List the flights and hotels that can be selected."""
    return {"flights": FLIGHTS, "hotels": HOTELS}


@app.tool()
def select_flight(flight_id: str) -> dict:
    """Choose the flight for this trip (replaces an earlier choice)."""
    if flight_id not in FLIGHTS:
        raise ToolError(f"unknown flight {flight_id!r}; choose one of {sorted(FLIGHTS)}")
    app.set_state("flight", flight_id)
    return _selection()


@app.tool()
def select_hotel(hotel_id: str, nights: int = 3) -> dict:
    """Choose the hotel and the number of nights for this trip (replaces an earlier choice)."""
    if hotel_id not in HOTELS:
        raise ToolError(f"unknown hotel {hotel_id!r}; choose one of {sorted(HOTELS)}")
    if not 1 <= nights <= 30:
        raise ToolError(f"nights must be between 1 and 30, got {nights}")
    app.set_state("hotel", {"id": hotel_id, "nights": nights})
    return _selection()


@app.tool()
def book_trip(traveller: str) -> dict:
    """Book the selected flight and hotel for `traveller`, then clear the selections."""
    trip = _selection()
    missing = [what for what in ("flight", "hotel") if trip[what] is None]
    if missing:
        raise ToolError(
            f"cannot book yet: no {' and no '.join(missing)} selected; "
            f"call {' and '.join('select_' + what for what in missing)} first"
        )
    total = trip["flight"]["price"] + trip["hotel"]["per_night"] * trip["hotel"]["nights"]
    bookings = app.get_state("bookings", 0) + 1
    app.set_state("bookings", bookings)
    app.delete_state("flight")
    app.delete_state("hotel")
    return {"booking": f"TRIP-{bookings:04d}", "traveller": traveller, **trip, "total": round(total, 2)}


if __name__ == "__main__":
    app.run()
