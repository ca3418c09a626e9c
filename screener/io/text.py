"""Bytes of an input as text, and the small checks the format readers share."""
from screener.io.structure import Problem


def decode(data: bytes) -> str:
    """UTF-8 text (a BOM dropped); binary data or another encoding is a read Problem."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise Problem("read", f"binary data, not text: NUL byte at offset {nul}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = data[error.start]
        raise Problem("read", f"not UTF-8 text: byte 0x{byte:02x} at offset {error.start}") from error


def leading_numbers(line: str, count: int) -> bool:
    """Whether the line starts with `count` numbers."""
    tokens = line.split()[:count]
    try:
        [float(token) for token in tokens]
    except ValueError:
        return False
    return len(tokens) == count


def jarvis_message(error: Exception) -> str:
    """jarvis raises errors with several arguments; str() of those is a tuple repr."""
    return " ".join(map(str, error.args)) or type(error).__name__
