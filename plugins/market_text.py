"""market_text: a text task on real market data. Did the index close above its open?

Each trading day of the S&P 500 and NASDAQ Composite daily series that the PyPI package ``arch`` carries
(1999-2018, about 10,000 days) becomes a sentence: open, close, high, low, volume and date, in one of several
wordings (English and German), in mixed number formats ("1,229.23", "1229.23", "1.229,23", "1 229,23",
"$1,229.23", "USD 1229.23", "1.22923 thousand"; volume as "877m", "877 million", "0.877bn", "877,000,000") and
with the figures in varying order. The label is ``up`` when the close is above the open, so the answer is in the
numbers and nowhere else. Days whose open and close agree to the cent are left out.

Splits are by date: train up to 2012, validation 2013-2015, test 2016-2018.

    plugins:
      market_text: {}
      finance: {numbers: xval}
      text_encoder: {numeric_channel: true, max_length: 64}
"""
from __future__ import annotations

import random
from datetime import date
from typing import ClassVar

from pydantic import Field
from torch.utils.data import Dataset

from plait.core.config import Options
from plait.core.errors import DataError
from plait.core.hookspecs import hookimpl
from plait.modalities.batch import collate

SPLIT_YEARS = {"train": (1999, 2012), "val": (2013, 2015), "test": (2016, 2018)}
NAMES = {"sp500": ("the S&P 500", "S&P 500", "SPX"), "nasdaq": ("the NASDAQ Composite", "Nasdaq", "COMP")}
ENGLISH = [
    "{name} on {date}: opened at {open}, closed at {close}; day range {low} to {high}, volume {volume}.",
    "{date}: {name} closed at {close} after opening at {open} (high {high}, low {low}).",
    "Session of {date}: {name} open {open} / high {high} / low {low} / close {close}, {volume} shares traded.",
    "{name} finished the session of {date} at {close}; it had started the day at {open}.",
    "{name} started {date} at {open} and ended at {close}, trading between {low} and {high}.",
    "Close {close} vs. open {open} for {name} ({date}); volume {volume}.",
    "{name}, {date}: last {close}, first trade {open}, intraday high {high}.",
    "On {date} the first print for {name} was {open}; the final print was {close}.",
]
GERMAN = [
    "{name} am {date}: Eröffnung {open}, Schluss {close}, Tageshoch {high}, Tagestief {low}.",
    "{name} schloss am {date} bei {close} Punkten, nachdem er bei {open} Punkten eröffnet hatte.",
]


class MarketTextOptions(Options):
    series: list[str] = Field(["sp500", "nasdaq"], description="arch.data series: sp500, nasdaq")
    renderings: int = Field(2, ge=1, description="sentences per training day (different wordings and formats)")
    seed: int = 0


PRICE_FORMATS = (  # English-language sentences: every price exact to the cent, so the label is in the text
    lambda v: f"{v:,.2f}", lambda v: f"{v:.2f}", lambda v: f"${v:,.2f}", lambda v: f"USD {v:.2f}",
    lambda v: f"{v:,.2f} points", lambda v: f"{v / 1000:.5f} thousand",
    lambda v: f"{v:,.2f}".replace(",", " ").replace(".", ","),  # French style
)


def _price(value: float, rng: random.Random, german: bool) -> str:
    if german:
        plain = f"{value:,.2f}".replace(",", "_").replace(".", ",").replace("_", ".")
        return rng.choice([plain, plain.replace(".", " ")])
    return rng.choice(PRICE_FORMATS)(value)


def _volume(value: float, rng: random.Random, german: bool) -> str:
    if german:
        return f"{value / 1e6:,.0f} Mio.".replace(",", ".")
    return rng.choice([f"{value / 1e6:.0f}m", f"{value / 1e6:,.0f} million", f"{value / 1e9:.3f}bn", f"{value:,.0f}"])


def _date(day: date, rng: random.Random, german: bool) -> str:
    if german:
        return rng.choice([day.strftime("%d.%m.%Y"), day.isoformat()])
    return rng.choice([day.isoformat(), day.strftime("%m/%d/%Y"), f"{day.day} {day:%B %Y}",
                       f"{day:%b} {day.day}, {day:%Y}"])


def render(series: str, day: date, row: dict, rng: random.Random) -> str:
    german = rng.random() < 0.2
    template = rng.choice(GERMAN if german else ENGLISH)
    fields = {key: _price(row[key.title()], rng, german) for key in ("open", "close", "high", "low")}
    name = rng.choice(NAMES[series])
    return template.format(name=name.removeprefix("the ") if german else name, date=_date(day, rng, german),
                           volume=_volume(row["Volume"], rng, german), **fields)


class MarketSentences(Dataset):
    modalities = ("text",)
    classes: ClassVar[list[str]] = ["down", "up"]
    collate_fn = staticmethod(collate)

    def __init__(self, options: MarketTextOptions, split: str) -> None:
        import importlib

        first, last = SPLIT_YEARS[split]
        copies = options.renderings if split == "train" else 1
        rng = random.Random(f"{options.seed}-{split}")
        self.samples = []
        for series in options.series:
            if series not in NAMES:
                raise DataError(f"plugins.market_text.series: unknown series '{series}'; known: {sorted(NAMES)}")
            frame = importlib.import_module(f"arch.data.{series}").load()
            for stamp, row in frame.iterrows():
                day = stamp.date()
                values = row.to_dict()
                if not first <= day.year <= last or round(values["Close"], 2) == round(values["Open"], 2):
                    continue
                label = int(round(values["Close"], 2) > round(values["Open"], 2))
                for copy in range(copies):
                    self.samples.append({"id": f"{series}-{day}-{copy}", "label": label,
                                         "text": render(series, day, values, rng), "image": None, "audio": None})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


@hookimpl
def plait_config_schema():
    return MarketTextOptions


@hookimpl
def plait_build_dataset(config, split):
    return MarketSentences(config.options(MarketTextOptions), split)
