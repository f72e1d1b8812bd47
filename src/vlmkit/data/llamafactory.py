"""LLaMA-Factory datasets whose `dataset_info.json` entry renames columns or role tags.

LLaMA-Factory reads a dataset through its entry in `dataset_info.json`: `formatting` (sharegpt or
alpaca), `ranking` (preference pairs), `columns` (its name -> the file's key) and `tags` (the
sharegpt turn keys and speaker names). A recipe's data source takes that entry as it is
(`llamafactory:`), and each record is rewritten here into LLaMA-Factory's default layout, which
`vlmkit.data.formats` and `vlmkit.data.preference` read. So a dataset a user already trains with
LLaMA-Factory needs no conversion script.
"""

from __future__ import annotations

from vlmkit.core.types import BadRecordError

# LLaMA-Factory's defaults: the column names of each formatting, and sharegpt's turn tags.
DEFAULT_COLUMNS = {
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", "images": "images", "videos": "videos",
                 "chosen": "chosen", "rejected": "rejected"},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system",
               "images": "images", "videos": "videos", "chosen": "chosen", "rejected": "rejected"},
}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# Speaker tags -> the default speaker names the sharegpt reader knows.
SPEAKER_TAGS = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


class RecordLayout:
    """Rewrites one dataset's records from its own column and tag names to LLaMA-Factory's default
    ones; `entry` is a `config.LlamaFactoryEntry`."""

    def __init__(self, entry):
        self.formatting = entry.formatting
        allowed = DEFAULT_COLUMNS[entry.formatting]
        wrong = sorted(set(entry.columns) - set(allowed))
        if wrong:
            raise ValueError(f"llamafactory.columns {wrong} are not {entry.formatting} columns (those are {sorted(allowed)})")
        if entry.tags and entry.formatting != "sharegpt":
            raise ValueError("llamafactory.tags name sharegpt turn keys; an alpaca dataset has no turns")
        # The file's key -> the default key, for every column the entry renames.
        self.renames = {theirs: allowed[ours] for ours, theirs in entry.columns.items() if theirs != allowed[ours]}
        tags = {**DEFAULT_TAGS, **entry.tags}
        self.role_key, self.content_key = tags["role_tag"], tags["content_tag"]
        self.speakers = {tags[t]: DEFAULT_TAGS[t] for t in SPEAKER_TAGS}
        self.turn_columns = ("conversations", "chosen", "rejected") if self.formatting == "sharegpt" else ()

    def apply(self, record, rid: str, source: str = ""):
        """The record in the default layout (a record that is not an object is left for the
        reader to refuse)."""
        if not isinstance(record, dict):
            return record
        clashes = sorted(k for k in self.renames.values() if k in record and k not in self.renames)
        if clashes:
            raise BadRecordError(rid, f"has both its renamed column and the default key {clashes}; keep one", source)
        out = {self.renames.get(k, k): v for k, v in record.items()}
        for column in self.turn_columns:
            value = out.get(column)
            if isinstance(value, list):
                out[column] = [self._turn(t, rid, f"{column}[{i}]", source) for i, t in enumerate(value)]
            elif isinstance(value, dict):  # a preference side: one assistant turn
                out[column] = self._turn(value, rid, column, source)
        return out

    def _turn(self, turn, rid: str, where: str, source: str):
        if not isinstance(turn, dict):
            return turn  # the reader names what is wrong with it
        if self.role_key not in turn or self.content_key not in turn:
            raise BadRecordError(rid, f"{where} needs {self.role_key!r} and {self.content_key!r} (the entry's role_tag and "
                                 f"content_tag); it has {sorted(turn)}", source)
        speaker = turn[self.role_key]
        if not isinstance(speaker, str) or speaker not in self.speakers:
            raise BadRecordError(rid, f"{where} has speaker {speaker!r:.60}, which is none of the entry's tags "
                                 f"{sorted(self.speakers)}", source)
        return {"from": self.speakers[speaker], "value": turn[self.content_key]}
