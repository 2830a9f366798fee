# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reverse file naming: a Baileys key file's name back to its key type and id (the reverse of fixFileName,
type by longest prefix, id by the shapes of Baileys' keys).
"""

from __future__ import annotations

import re

from ansible.module_utils.baileys_dr_codec import (
    KEY_TYPES,
    decode_base64,
)


MAX_CANDIDATES = 8
TYPES_BY_LENGTH = tuple(sorted(KEY_TYPES, key=len, reverse=True))

# -- id shapes of Baileys' keys (reverse of fixFileName) ------------------------------------
DIGITS_RE = re.compile(r"\A[0-9]+\Z")
# libsignal ProtocolAddress.toString(): <user>[_<domain type>].<device>
SIGNAL_ADDRESS_RE = re.compile(r"\A[0-9]+(?:_[0-9]+)?\.[0-9]+\Z")
# Group JIDs hold no ':' (only user JIDs carry a device); old groups are <creator>-<time>@g.us.
GROUP_JID = r"(?:[0-9]+(?:-[0-9]+)?@g\.us|status@broadcast)"
GROUP_JID_RE = re.compile(r"\A%s\Z" % GROUP_JID)
# SenderKeyName.toString(): <group jid>::<signal user>::<device>, the file holds '--' for '::'.
SENDER_KEY_NAME_RE = re.compile(r"\A(%s)--([0-9]+(?:_[0-9]+)?)--([0-9]+)\Z" % GROUP_JID)
LID_MAPPING_RE = re.compile(r"\A[0-9]+(?:_reverse)?\Z")
BASE64_NAME_RE = re.compile(r"\A[A-Za-z0-9+=_]+\Z")

# -- file names: type by longest prefix, id by a type-aware reverse of fixFileName ------------


def parse_key_file_name(file_name):
    """(type, name part) of a key file, longest type first (sender-key-memory before sender-key), else None."""
    if not file_name.endswith(".json"):
        return None
    stem = file_name[: -len(".json")]
    for key_type in TYPES_BY_LENGTH:
        if stem.startswith(key_type + "-") and len(stem) > len(key_type) + 1:
            return key_type, stem[len(key_type) + 1:]
    return None


def preimage_count(name):
    """How many ids fixFileName turns into name: 2 per '-' ('-' or ':'), Fibonacci per run of '_' ('__' or '/')."""
    count = 1
    for char in name:
        if char == "-":
            count *= 2
    for run in re.findall(r"_+", name):
        a, b = 1, 1
        for _ in range(len(run) - 1):
            a, b = b, a + b
        count *= b
    return count


def preimages(name, limit=MAX_CANDIDATES):
    """Up to limit ids that fixFileName turns into name, the name itself first."""
    found = []

    def walk(position, prefix):
        if len(found) >= limit:
            return
        if position == len(name):
            found.append(prefix)
        elif name[position] == "-":
            walk(position + 1, prefix + "-")
            walk(position + 1, prefix + ":")
        elif name.startswith("__", position):
            walk(position + 1, prefix + "_")
            walk(position + 2, prefix + "/")
        else:
            walk(position + 1, prefix + name[position])

    walk(0, "")
    return found


class Reverse:
    """Result of the reverse mapping of one file name: id, or None with candidates and the reason."""

    __slots__ = ("key_id", "reason", "candidates", "candidate_count", "rule")

    def __init__(self, key_id=None, reason=None, name=None, rule=None):
        self.key_id = key_id
        self.reason = reason
        self.rule = rule
        if key_id is None:
            self.candidates = preimages(name)
            self.candidate_count = preimage_count(name)
        else:
            self.candidates = [key_id]
            self.candidate_count = 1


def reverse_key_name(key_type, name):
    """The original id of a key file's name part, by the type's id shape; Reverse(None, reason) when it cannot be told.

    Every id returned satisfies fix_file_name(id) == name.
    """
    plain = "-" not in name and "__" not in name
    if key_type == "pre-key":
        if DIGITS_RE.match(name):
            return Reverse(name, rule="pre-key ids are integers")
        return Reverse(None, "pre-key ids are integers", name)
    if key_type == "lid-mapping":
        if LID_MAPPING_RE.match(name):
            return Reverse(name, rule="lid-mapping ids are <digits> or <digits>_reverse")
        return Reverse(None, "lid-mapping ids are <digits> or <digits>_reverse", name)
    if key_type == "app-state-sync-key":
        if BASE64_NAME_RE.match(name):
            key_id = name.replace("__", "/")
            if "_" not in key_id and decode_base64(key_id) is not None:
                return Reverse(key_id, rule="app-state-sync-key ids are base64: '__' is '/'")
        return Reverse(None, "app-state-sync-key ids are base64 (a '-' or a lone '_' cannot come from one)", name)
    if key_type == "sender-key":
        match = SENDER_KEY_NAME_RE.match(name)
        if match:
            return Reverse("::".join(match.groups()), rule="sender-key ids are <group jid>::<user>::<device>")
        return Reverse(None, "not the sender-key shape <group jid>--<user>--<device>", name)
    if key_type == "sender-key-memory" and GROUP_JID_RE.match(name):
        return Reverse(name, rule="sender-key-memory ids are group JIDs (no ':')")
    if key_type in ("session", "identity-key") and SIGNAL_ADDRESS_RE.match(name):
        return Reverse(name, rule="%s ids are signal addresses <user>.<device>" % key_type)
    if plain:
        return Reverse(name, rule="no '-' or '__': the name is the id")
    return Reverse(None, "a '-' may have been ':' and '__' may have been '/'", name)
