# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""dotenv files read exactly as the application's dotenv package reads them, and rewritten keeping
comments, order and line endings: the engine of the baileys_env_file module (and of the store switch).

EnvFile takes an AnsibleModule-like object (params, check_mode, _diff, no_log, warn, atomic_move,
set_*_if_different); the module baileys_env_file is its thin front.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time

from ansible.module_utils.basic import FILE_COMMON_ARGUMENTS
from ansible.module_utils.baileys_dr_fs import fsync_dir, write_file_atomic
from ansible.module_utils.baileys_dr_secrets import MASK, SECRET_NAME_PATTERN
from ansible.module_utils.common.text.converters import to_bytes


KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
SAFE_UNQUOTED = re.compile(r"[A-Za-z0-9_./:@+-]*\Z")
QUOTES = "'\"`"

# JavaScript's \s (what dotenv's regular expression and String.prototype.trim treat as blank).
_JS_SPACE = ("\t\n\v\f\r \u00a0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
             + "\u2028\u2029\u202f\u205f\u3000\ufeff")
_S = "[%s]" % _JS_SPACE
_EOL = "\n\r\u2028\u2029"
# dotenv's LINE regular expression (lib/main.js, v16 and v17), with JavaScript's \s, \w, ".", "^"
# and "$" (multiline) spelled out, so that Python reads a file exactly as the application does:
#   /(?:^|^)\s*(?:export\s+)?([\w.-]+)(?:\s*=\s*?|:\s+?)(\s*'(?:\\'|[^'])*'|\s*"(?:\\"|[^"])*"|
#    \s*`(?:\\`|[^`])*`|[^#\r\n]+)?\s*(?:#.*)?(?:$|$)/mg
_DOTENV_LINE = re.compile(
    r"(?:(?<=[{eol}])|\A){s}*(?:export{s}+)?(?P<key>[A-Za-z0-9_.-]+)(?P<sep>{s}*={s}*?|:{s}+?)"
    r"(?P<value>{s}*'(?:\\'|[^'])*'|{s}*\"(?:\\\"|[^\"])*\"|{s}*`(?:\\`|[^`])*`|[^#\r\n]+)?"
    r"{s}*(?:#[^{eol}]*)?(?=[{eol}]|\Z)".format(s=_S, eol=_EOL)
)
_KEY_LEAD = re.compile(r"{s}*(?:export{s}+)?\Z".format(s=_S))
_OUTER_QUOTES = re.compile(r"\A(['\"`])([\s\S]*)\1(?=[%s]|\Z)" % _EOL)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LAST_BREAK = re.compile(r"(?:\r\n|\r|\n)\Z")


class EnvFileError(Exception):
    pass


def js_trim(text):
    return text.strip(_JS_SPACE)


def dotenv_value(raw):
    """The value dotenv gives to the matched value text raw ("" for a missing value)."""
    value = js_trim(raw or "")
    quote = value[:1]
    match = _OUTER_QUOTES.match(value)
    if match and match.end() == len(value):
        value = match.group(2)
    elif match:
        # JavaScript's replace with /m: the closing quote may end an inner line.
        value = match.group(2) + value[match.end():]
    if quote == '"':
        value = value.replace("\\n", "\n").replace("\\r", "\r")
    return value


def quote_style(value):
    """The ways value can be written so that dotenv reads it back unchanged, best first."""
    styles = []
    if SAFE_UNQUOTED.match(value):
        styles.append("")
    if '"' not in value and "\\" not in value:
        styles.append('"')
    if "'" not in value:
        styles.append("'")
    if "`" not in value:
        styles.append("`")
    return styles


def encode_value(value, prefer=None):
    styles = quote_style(value)
    if not styles:
        raise EnvFileError("no dotenv quoting reads it back unchanged")
    style = prefer if prefer in styles else styles[0]
    return "%s%s%s" % (style, value, style)


class Line:
    """One physical line: its text (without the line break) and its line break."""

    __slots__ = ("text", "eol")

    def __init__(self, text, eol):
        self.text = text
        self.eol = eol


class Assignment:
    """One definition dotenv sees: lines first..last of the file."""

    def __init__(self, key, value, first, last, prefix, gap, core, trail, suffix):
        self.key = key
        self.value = value
        self.first = first
        self.last = last
        self.prefix = prefix    # start of the first line up to the value (indent, export, key, separator)
        self.gap = gap          # blanks between separator and value
        self.core = core        # the value as written (quotes included)
        self.trail = trail      # blanks after an unquoted value
        self.suffix = suffix    # rest of the last line (blanks, comment)

    @property
    def quote(self):
        core = self.core
        if len(core) >= 2 and core[0] in QUOTES and core[-1] == core[0]:
            return core[0]
        return ""

    def render(self, written):
        return self.prefix + self.gap + written + self.trail + self.suffix


class DotenvDocument:
    """A dotenv file as lines plus the assignments dotenv finds in them."""

    def __init__(self, text):
        self.lines = []
        position = 0
        for match in _LINE_BREAK.finditer(text):
            self.lines.append(Line(text[position:match.start()], match.group()))
            position = match.end()
        if position < len(text):
            self.lines.append(Line(text[position:], ""))
        self.assignments = self._parse()

    def default_eol(self):
        for line in self.lines:
            if line.eol:
                return line.eol
        return "\n"

    def _parse(self):
        normalized = "".join(line.text + ("\n" if line.eol else "") for line in self.lines)
        starts, offset = [], 0
        for line in self.lines:
            starts.append(offset)
            offset += len(line.text) + (1 if line.eol else 0)

        def line_of(position):
            low, high = 0, len(starts) - 1
            while low < high:
                middle = (low + high + 1) // 2
                if starts[middle] <= position:
                    low = middle
                else:
                    high = middle - 1
            return low

        assignments, used = [], set()
        for match in _DOTENV_LINE.finditer(normalized):
            first = line_of(match.start("key"))
            value_end = match.end("value") if match.group("value") is not None else match.end("sep")
            last = line_of(value_end - 1)
            if set(range(first, last + 1)) & used or not _KEY_LEAD.match(normalized[starts[first]:match.start("key")]):
                raise EnvFileError("line %d holds more than one assignment (unusual line separators)" % (first + 1))
            used.update(range(first, last + 1))
            raw = match.group("value") or ""
            core = raw.strip(_JS_SPACE)
            if core:
                lead = raw[:len(raw) - len(raw.lstrip(_JS_SPACE))]
                gap = "" if "\n" in lead else lead
                trail = raw[len(lead) + len(core):]
            else:
                gap, trail = "", raw if "\n" not in raw else ""
            line_end = starts[last] + len(self.lines[last].text)
            assignments.append(Assignment(
                key=match.group("key"),
                value=dotenv_value(match.group("value")),
                first=first,
                last=last,
                prefix=normalized[starts[first]:match.end("sep")],
                gap=gap,
                core=core,
                trail=trail,
                suffix=normalized[value_end:line_end] if value_end <= line_end else "",
            ))
        return assignments

    def values(self):
        """What dotenv reads: the last definition of every key wins."""
        return {a.key: a.value for a in self.assignments}

    def duplicates(self):
        seen, duplicated = set(), []
        for assignment in self.assignments:
            if assignment.key in seen and assignment.key not in duplicated:
                duplicated.append(assignment.key)
            seen.add(assignment.key)
        return duplicated

    def render(self, replace=None, append=(), mask=None):
        """Text of the file.

        replace: {index of an assignment: new first line, or None to drop its lines};
        append: new "KEY=value" lines; mask: a regex whose matching keys' values become MASK.
        """
        replace = replace or {}
        by_first = {a.first: (index, a) for index, a in enumerate(self.assignments)}
        out, skip_to = [], -1
        for number, line in enumerate(self.lines):
            if number <= skip_to:
                continue
            entry = by_first.get(number)
            if entry is None:
                out.append(self._masked_other(line.text, mask) + line.eol)
                continue
            index, assignment = entry
            skip_to = assignment.last
            eol = self.lines[assignment.last].eol
            if index in replace:
                if replace[index] is None:
                    continue
                text = replace[index]
                if mask is not None and mask.search(assignment.key):
                    text = assignment.render(MASK)
                out.append(text + eol)
            elif mask is not None and mask.search(assignment.key):
                out.append(assignment.render(MASK) + eol)
            else:
                out.extend(line.text + line.eol for line in self.lines[assignment.first:assignment.last + 1])
        if append:
            if out and not out[-1].endswith(("\n", "\r")):
                out[-1] += self.default_eol()
            for key, text in append:
                if mask is not None and mask.search(key):
                    text = "%s=%s" % (key, MASK)
                out.append(text + self.default_eol())
        text = "".join(out)
        if self.lines and not self.lines[-1].eol:
            # A file without a final line break keeps it that way whatever was appended or removed at
            # its end, so that setting keys and setting them back gives the same bytes.
            text = _LAST_BREAK.sub("", text)
        return text

    @staticmethod
    def _masked_other(text, mask):
        """A line dotenv does not read: shown as is unless it looks like a secret assignment."""
        if mask is None or not mask.search(text):
            return text
        stripped = text.lstrip()
        if not stripped or stripped.startswith("#"):
            return text
        cut = min([i for i in (text.find("="), text.find(":")) if i >= 0] or [-1])
        return text if cut < 0 else text[:cut + 1] + MASK


def write_all(fd, data):
    """os.write until every byte is written (the step a crash can cut short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:1 << 16])
        view = view[written:]


class EnvFile:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.path = self.params["path"]
        if self.params["follow"] and os.path.islink(self.path):
            self.path = os.path.realpath(self.path)
        try:
            self.secret = re.compile(self.params["secret_keys_regex"] or SECRET_NAME_PATTERN, re.IGNORECASE)
        except re.error as exc:
            raise EnvFileError("secret_keys_regex %r is not a valid regular expression: %s"
                               % (self.params["secret_keys_regex"], exc))
        self.wanted = self._wanted_values()
        self.result = dict(changed=False, file_changed=False, path=self.path, changed_keys=[], created=False, duplicates=[])

    def _wanted_values(self):
        wanted = {}
        for key, value in (self.params["values"] or {}).items():
            if not isinstance(key, str) or not KEY_NAME.match(key):
                raise EnvFileError("values: invalid key name %r: a key must match [A-Za-z_][A-Za-z0-9_]*" % (key,))
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int):
                value = str(value)
            elif value is not None and not isinstance(value, str):
                raise EnvFileError("values: the value of %s must be a string or null, not %s" % (key, type(value).__name__))
            if value is not None:
                if any(c in value for c in "\n\r\x00"):
                    raise EnvFileError("values: the value of %s holds a line break or a NUL byte; "
                                       "baileys_env_file writes one line per key" % key)
                if not quote_style(value):
                    raise EnvFileError("values: the value of %s holds ', \", ` and \\ together; no dotenv quoting "
                                       "reads it back unchanged" % key)
            wanted[key] = value
        return wanted

    # -- reading ---------------------------------------------------------------------------------

    def _read(self):
        if os.path.isdir(self.path):
            raise EnvFileError("path %s is a directory, not a dotenv file" % self.path)
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EnvFileError("cannot read %s: %s" % (self.path, exc.strerror))
        return data.decode("utf-8", errors="surrogateescape")

    # -- planning --------------------------------------------------------------------------------

    def plan(self, document):
        """(new text, changed keys) for the wanted values."""
        current = document.values()
        last = {}
        for index, assignment in enumerate(document.assignments):
            last[assignment.key] = index
        replace, append, changed = {}, [], []
        for key, value in self.wanted.items():
            present = key in current
            if value is None:
                if not present:
                    continue
                for index, assignment in enumerate(document.assignments):
                    if assignment.key == key:
                        replace[index] = None
            else:
                if present and current[key] == value:
                    continue
                if present:
                    assignment = document.assignments[last[key]]
                    replace[last[key]] = assignment.render(encode_value(value, prefer=assignment.quote))
                else:
                    append.append((key, "%s=%s" % (key, encode_value(value))))
            changed.append(key)
        new_text = document.render(replace=replace, append=append)
        self.check_reads_back(new_text, current)
        return new_text, changed

    def check_reads_back(self, text, current):
        """Refuse a text dotenv would read otherwise than intended (an unterminated quote before
        a new line can swallow it): every key keeps its value but those set or removed."""
        expected = dict(current)
        for key, value in self.wanted.items():
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = value
        try:
            got = DotenvDocument(text).values()
        except EnvFileError as exc:
            got = {None: str(exc)}
        if got != expected:
            differ = sorted(str(key) for key in set(got) | set(expected) if got.get(key) != expected.get(key))
            raise EnvFileError("refusing to write %s: dotenv would then read other values for %s (an unterminated "
                               "quote in the file?)" % (self.path, ", ".join(differ)))

    # -- running ---------------------------------------------------------------------------------

    def run(self):
        if self.params["return_previous"] and not self.module.no_log:
            raise EnvFileError("return_previous returns the values %s held, secrets included: "
                               "set no_log: true on this task" % self.path)
        if self.params["state"] == "absent":
            return self.remove_file()
        text = self._read()
        creating = text is None
        if creating:
            if not self.params["create"]:
                if all(value is None for value in self.wanted.values()):
                    self.result["msg"] = "%s does not exist: no key to remove" % self.path
                    self._previous(DotenvDocument(""))
                    return self.result
                raise EnvFileError("%s does not exist; set create: true to create it" % self.path)
            text = ""
        try:
            document = DotenvDocument(text)
        except EnvFileError as exc:
            raise EnvFileError("cannot edit %s safely: %s" % (self.path, exc))
        duplicates = document.duplicates()
        self.result["duplicates"] = duplicates
        for key in duplicates:
            count = sum(1 for assignment in document.assignments if assignment.key == key)
            self.module.warn("%s is defined %d times in %s; dotenv uses the last definition (the one baileys_env_file "
                             "updates; removing the key removes all of them)" % (key, count, self.path))
        self._previous(document)
        new_text, changed_keys = self.plan(document)
        self.result["changed_keys"] = changed_keys
        content_changed = creating or new_text != text
        self.result["file_changed"] = content_changed
        if self.params["record_path"]:
            self.record(document)
        if self.module._diff:
            self.result["diff"] = dict(
                before_header=self.path if not creating else "%s (absent)" % self.path,
                after_header=self.path + (" (changed: %s)" % ", ".join(changed_keys) if changed_keys else ""),
                before="" if creating else self.masked(text),
                after=self.masked(new_text),
            )
        if content_changed:
            self.result["changed"] = True
            self.result["created"] = creating
            if not self.module.check_mode:
                if self.params["backup"] and not creating:
                    self.result["backup_file"] = self.backup()
                self.write(new_text, creating)
        if not (creating and self.module.check_mode):
            self.result["changed"] = self.set_attributes(self.result["changed"])
        return self.result

    def record(self, document):
        """The record of what the file held, written durably before the file is touched."""
        path = self.params["record_path"]
        current = document.values()
        data = dict(self.params["record_data"] or {})
        data["env"] = {key: dict(present=key in current, value=current.get(key)) for key in self.wanted}
        self.result["record_path"] = path
        self.result["changed"] = True
        if self.module.check_mode:
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700)
                fsync_dir(os.path.dirname(directory))
            write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise EnvFileError("cannot write the record %s, so %s was left unchanged: %s"
                               % (path, self.path, exc.strerror or exc))

    def masked(self, text):
        return DotenvDocument(text).render(mask=self.secret)

    def _previous(self, document):
        if not self.params["return_previous"]:
            return
        current = document.values()
        self.result["previous"] = {
            key: dict(present=key in current, value=current.get(key)) for key in self.wanted
        }

    def remove_file(self):
        if self.wanted:
            raise EnvFileError("values must be empty with state: absent (it removes the whole file %s)" % self.path)
        if os.path.isdir(self.path):
            raise EnvFileError("path %s is a directory, not a dotenv file" % self.path)
        if not os.path.lexists(self.path):
            return self.result
        self.result["changed"] = self.result["file_changed"] = True
        if self.module._diff:
            self.result["diff"] = dict(before_header=self.path, after_header="%s (absent)" % self.path,
                                       before=self.masked(self._read() or ""), after="")
        if not self.module.check_mode:
            if self.params["backup"]:
                self.result["backup_file"] = self.backup()
            os.unlink(self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self.result

    def backup(self):
        """Copy of the file beside it, 0600, same owner and group (it holds the same secrets)."""
        stamp = time.strftime("%Y-%m-%d@%H:%M:%S", time.localtime())
        source_stat = os.stat(self.path)
        with open(self.path, "rb") as fh:
            data = fh.read()
        # Ansible's <file>.<pid>.<time>~; a second backup by the same process within the same second (a switch and its
        # rollback) gets a counter, never the first one's name.
        for count in range(100):
            destination = "%s.%s.%s%s~" % (self.path, os.getpid(), stamp, ".%d" % count if count else "")
            try:
                fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise EnvFileError("cannot create the backup %s: %s" % (destination, exc.strerror))
        else:
            raise EnvFileError("cannot create a backup of %s: 100 backups named %s.%s.%s* exist"
                               % (self.path, self.path, os.getpid(), stamp))
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, data)
            os.fsync(fd)
            try:
                os.fchown(fd, source_stat.st_uid, source_stat.st_gid)
            except PermissionError:
                pass
        finally:
            os.close(fd)
        return destination

    def write(self, text, creating):
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".%s.tmp-" % os.path.basename(self.path), dir=directory)
        except OSError as exc:
            raise EnvFileError("cannot write in %s: %s" % (directory, exc.strerror))
        try:
            try:
                write_all(fd, to_bytes(text, errors="surrogateescape"))
                os.fsync(fd)
            finally:
                os.close(fd)
            # atomic_move gives a new file 0666 & ~umask after the rename: with this umask a new
            # .env is 0600 from its first instant; an existing file keeps its mode and owner.
            umask = os.umask(0o077) if creating else None
            try:
                self.module.atomic_move(tmp, self.path)
            finally:
                if umask is not None:
                    os.umask(umask)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(exc, Exception):  # OSError, or the Exception atomic_move raises
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise EnvFileError("writing %s failed, the file is unchanged: %s" % (self.path, reason))
            raise
        fsync_dir(directory)

    def set_attributes(self, changed):
        """The standard file arguments (add_file_common_args) applied as ini_file applies them. The store switch runs
        this engine without them: the file keeps its mode, owner and group."""
        if all(self.params.get(name) is None for name in FILE_COMMON_ARGUMENTS if name != "unsafe_writes"):
            return changed
        file_args = self.module.load_file_common_arguments(self.params, path=self.path)
        return self.module.set_fs_attributes_if_different(file_args, changed)

    def invocation(self):
        """The module arguments as echoed in the result: secret values masked."""
        params = dict(self.params)
        params["values"] = {
            key: (MASK if value is not None and self.secret.search(str(key)) else value)
            for key, value in (params.get("values") or {}).items()
        }
        return dict(module_args=params)


def env_file_argument_spec():
    """The options of baileys_env_file (a new dict per call: AnsibleModule changes the one it gets)."""
    return dict(
        path=dict(type="path", required=True, aliases=["dest"]),
        values=dict(type="dict", default={}, no_log=False),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        create=dict(type="bool", default=False),
        backup=dict(type="bool", default=False),
        follow=dict(type="bool", default=True),
        secret_keys_regex=dict(type="str"),
        return_previous=dict(type="bool", default=False),
        record_path=dict(type="path"),
        record_data=dict(type="dict", default={}),
    )
