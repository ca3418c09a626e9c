"""Element symbols and numbers, from jarvis' own table."""
import functools
import json


def element_symbol(text: str) -> str:
    """The element symbol `text` names in any letter case ('o' -> 'O', 'CL' -> 'Cl'); a
    ValueError for a name that is no element jarvis knows."""
    symbol = text.strip().capitalize()
    if symbol not in element_tables()[0]:
        raise ValueError(f"{text!r} is not an element symbol")
    return symbol


@functools.cache
def element_tables() -> tuple[dict[str, int], dict[int, str], dict[int, float]]:
    """symbol -> Z, Z -> symbol, Z -> electronegativity, for the elements jarvis knows; read
    from jarvis' own table file, because importing jarvis.core.specie loads much more, and the
    CLI checks element symbols too."""
    from importlib.resources import files

    chem_data = json.loads(files("jarvis.core").joinpath("Elements.json").read_text())
    numbers = {symbol: int(data["Z"]) for symbol, data in chem_data.items()}
    return (numbers, {z: symbol for symbol, z in numbers.items()},
            {int(data["Z"]): float(data["X"]) for data in chem_data.values()})
