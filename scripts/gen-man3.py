#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Writes libqed's section-3 manual pages from include/qed.h, so the C documentation is written
once (as the Rust doc comments cbindgen copies into the header):

  libqed.3       the header's opening comment (conventions, durability, backing-file security),
                 the constants, the types with their fields, and the list of functions;
  <function>.3   one page per function: prototype, description, return value, thread safety.

Usage: gen-man3.py HEADER OUTDIR   (OUTDIR is emptied of *.3 first, so removed functions go)

Everything is derived from the header; a declaration the parser does not understand, or a
function without a doc comment, is an error rather than a page left out.
"""

import os
import re
import sys
import time


def fail(msg):
    sys.exit(f"gen-man3: {msg}")


def strip_comment(lines):
    """The text of a /* */ or /** */ comment, without the stars, as lines."""
    out = []
    for ln in lines:
        ln = ln.strip()
        ln = re.sub(r"^/\*\*?", "", ln)
        ln = re.sub(r"\*/$", "", ln)
        ln = re.sub(r"^\* ?", "", ln.strip()) if ln.strip().startswith("*") else ln.strip()
        out.append(ln.rstrip())
    while out and not out[0]:
        out.pop(0)
    while out and not out[-1]:
        out.pop()
    return out


def parse(text):
    """Splits the header into its opening comment and a list of documented declarations:
    (kind, name, code, doc, members) with kind define/type/function."""
    lines = text.split("\n")
    overview, items, doc = None, [], None
    i = 0
    while i < len(lines):
        ln = lines[i]
        s = ln.strip()
        if s.startswith("/*"):
            j = i
            while "*/" not in lines[j]:
                j += 1
            body = strip_comment(lines[i : j + 1])
            if s.startswith("/**"):
                doc = body
            elif overview is None and not any("SPDX-License-Identifier" in b for b in body):
                overview = body
            i = j + 1
            continue
        if not s or s.startswith("//"):
            i += 1
            continue
        if s.startswith("#"):
            m = re.match(r"#define\s+(\w+)\s+(.*)", s)
            if m and m.group(1) != "QED_H":
                items.append(("define", m.group(1), s, doc, []))
            doc = None
            i += 1
            continue
        if s.startswith('extern "C"') or s.startswith("}  //") or s == "}":
            i += 1
            continue
        # A declaration: up to the ';' that closes it at brace depth 0.
        j, depth, stmt = i, 0, []
        while True:
            stmt.append(lines[j])
            depth += lines[j].count("{") - lines[j].count("}")
            if depth == 0 and lines[j].rstrip().endswith(";"):
                break
            j += 1
            if j >= len(lines):
                fail(f"unterminated declaration at line {i + 1}")
        items.append(classify(stmt, doc, i + 1))
        doc = None
        i = j + 1
    if overview is None:
        fail("no opening comment")
    return overview, items


def classify(stmt, doc, lineno):
    code = "\n".join(stmt)
    flat = " ".join(s.strip() for s in stmt)
    if "{" in code:
        # A struct, union or enum with documented members.
        m = re.match(r"typedef\s+(struct|union|enum)\s+(\w+)\s*\{", flat) or re.match(
            r"(struct|union|enum)\s+(\w+)\s*\{", flat
        )
        if not m:
            fail(f"line {lineno}: declaration not understood: {flat[:80]}")
        members, mdoc, k = [], None, 1
        body = stmt[1:-1]
        while k <= len(body):
            s = body[k - 1].strip()
            if s.startswith("/*"):
                j = k
                while "*/" not in body[j - 1]:
                    j += 1
                mdoc = strip_comment(body[k - 1 : j])
                k = j + 1
                continue
            if s:
                mm = re.search(r"\(\s*\*\s*(\w+)\s*\)", s) or re.search(
                    r"(\w+)\s*(\[[^]]*\])?\s*(=[^,;]*)?[;,]?$", s
                )
                if not mm:
                    fail(f"line {lineno}: member not understood: {s}")
                members.append((mm.group(1), s, mdoc))
                mdoc = None
            k += 1
        return ("type", m.group(2), "\n".join(strip_member_comments(stmt)), doc, members)
    m = re.match(r"typedef\s+.*\(\s*\*\s*(\w+)\s*\)\s*\(.*\)\s*;$", flat) or re.match(
        r"typedef\s+.*?(\w+)\s*;$", flat
    )
    if m:
        return ("type", m.group(1), flat, doc, [])
    m = re.match(r"(.*?)\b(\w+)\s*\((.*)\)\s*;$", flat)
    if m:
        if not doc:
            fail(f"line {lineno}: function {m.group(2)} has no doc comment")
        return ("function", m.group(2), flat, doc, [])
    fail(f"line {lineno}: declaration not understood: {flat[:80]}")


def is_comment_line(s):
    s = s.strip()
    return s.startswith("/*") or s.startswith("*")


def strip_member_comments(stmt):
    """The declaration without its member doc comments (they are listed below it instead)."""
    out, inside = [], False
    for ln in stmt:
        s = ln.strip()
        if s.startswith("/*"):
            inside = "*/" not in s
            continue
        if inside:
            inside = "*/" not in s
            continue
        out.append(ln)
    return out


# ---- roff ----------------------------------------------------------------------------------


def esc(text):
    """Plain text to roff: backslashes, then the inline markup of the doc comments."""
    text = text.replace("\\", "\\e")

    def code(m):
        return "\\fB" + m.group(1).replace("-", "\\-") + "\\fP"

    text = re.sub(r"`([^`]+)`", code, text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fP", text)
    # Negative errno values are minus signs, not hyphens.
    text = re.sub(r"(?<![\w\\])-(E[A-Z]+|errno)\b", r"\\-\1", text)
    return text


def line(text):
    """A text line that roff cannot mistake for a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def paragraphs(lines):
    """Doc-comment lines to paragraphs (blank-line separated), bullets kept apart."""
    paras, cur = [], []
    for ln in lines:
        if not ln.strip():
            if cur:
                paras.append(cur)
            cur = []
        elif ln.startswith("# "):
            if cur:
                paras.append(cur)
            paras.append([ln])
            cur = []
        elif ln.startswith("- "):
            if cur:
                paras.append(cur)
            cur = [ln]
        else:
            cur.append(ln.strip())
    if cur:
        paras.append(cur)
    return [" ".join(p) for p in paras]


def body_roff(paras):
    out = []
    for p in paras:
        if p.startswith("- "):
            item = esc(p[2:])
            m = re.match(r"([A-Z][\w -]*):\s(.*)", item)
            if m:
                item = f"\\fB{m.group(1)}:\\fP {m.group(2)}"
            out += [".IP \\(bu 2", line(item)]
        else:
            out += [".PP", line(esc(p))]
    return out


def th(name, section, version):
    date = ""
    if "SOURCE_DATE_EPOCH" in os.environ:
        date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ["SOURCE_DATE_EPOCH"])))
    return [
        f".\\\" Generated by scripts/gen-man3.py from include/qed.h; do not edit.",
        f'.TH {name.upper()} {section} "{date}" "libqed {version}" "libqed Manual"',
    ]


def split_sections(doc):
    """A function's doc comment to {section: paragraphs}: **Returns:** goes to RETURN VALUE,
    **Thread-safety:** to THREAD SAFETY, a '# Heading' to its own section, the rest (with its
    bold labels) to DESCRIPTION."""
    secs = {"DESCRIPTION": []}
    current = "DESCRIPTION"
    for p in paragraphs(doc):
        if p.startswith("# "):
            current = p[2:].strip().upper()
            secs.setdefault(current, [])
            continue
        # Several labelled parts may share a paragraph: "**Ownership:** ... **Thread-safety:** ...".
        for part in re.split(r"\s(?=\*\*[A-Z][\w -]*:\*\*)", p):
            m = re.match(r"\*\*([A-Z][\w -]*):\*\*\s*(.*)", part)
            label = m.group(1) if m else None
            if label in ("Returns", "Thread-safety"):
                sec = "RETURN VALUE" if label == "Returns" else "THREAD SAFETY"
                secs.setdefault(sec, []).append(m.group(2)[:1].upper() + m.group(2)[1:])
            else:
                secs.setdefault(current, []).append(part)
    return secs


def summary(doc):
    """The first sentence of a doc comment, for NAME lines and lists."""
    first = paragraphs(doc)[0] if doc else ""
    m = re.match(r"(.+?\.)(\s|$)", first)
    s = (m.group(1) if m else first).rstrip(".")
    return s


def type_roff(code, doc, members, name=None):
    """A type: its doc (led by its name, when given), its declaration, each member's doc."""
    out = body_roff(paragraphs(doc or []))
    if name and len(out) > 1:
        out[1] = f"\\fB{name}\\fP: " + out[1].removeprefix("\\&")
    out += [".PP", ".in +4n", ".EX"] + [line(esc_code(c)) for c in code.split("\n")] + [".EE", ".in"]
    for mname, _, mdoc in members:
        out += [".TP", f"\\fI{mname}\\fP"]
        paras = paragraphs(mdoc or ["(undocumented)"])
        out.append(line(esc(paras[0])))
        for p in paras[1:]:
            out += [".IP", line(esc(p))]
    return out


def synopsis(proto):
    """A prototype as man-pages(7) sets it: types bold, parameter names italic."""
    m = re.match(r"(.*\()(.*)\);$", proto)
    params = [p.strip() for p in m.group(2).split(",")] if m else []
    if not m or any("(" in p for p in params) or params == ["void"]:
        return f'.B "{esc_code(proto)}"'
    # .BI alternates bold and italic words: bold text runs up to each parameter name. Lines
    # break after a comma past 72 columns, continuing under the opening parenthesis.
    lines, words, bold, width = [], [], m.group(1), 0
    for i, p in enumerate(params):
        pm = re.match(r"(.*?)(\w+)$", p)
        if words and width + len(bold + p) > 72:
            lines.append(words + [f'"{esc_code(bold.rstrip())}"'])
            words, bold, width = [], " " * len(m.group(1)), 0
        words += [f'"{esc_code(bold + pm.group(1))}"', pm.group(2)]
        width += len(bold + p)
        bold = ", " if i + 1 < len(params) else ");"
    lines.append(words + [f'"{bold}"'])
    return "\n".join(".BI " + " ".join(ws) for ws in lines)


def esc_code(c):
    return c.replace("\\", "\\e").replace("-", "\\-")


def write_pages(header, outdir):
    overview, items = parse(open(header, encoding="utf-8").read())
    defines = [it for it in items if it[0] == "define"]
    types = [it for it in items if it[0] == "type"]
    funcs = [it for it in items if it[0] == "function"]
    if not funcs:
        fail("no functions found in the header")
    dv = {it[1]: it[2].split()[2] for it in defines}
    try:
        version = ".".join(dv[f"QED_VERSION_{p}"] for p in ("MAJOR", "MINOR", "PATCH"))
    except KeyError:
        fail("QED_VERSION_MAJOR/MINOR/PATCH missing")
    fnames = {f[1] for f in funcs}

    os.makedirs(outdir, exist_ok=True)
    for old in os.listdir(outdir):
        if old.endswith(".3"):
            os.remove(os.path.join(outdir, old))

    # libqed.3: the overview.
    title = overview[0]
    m = re.match(r"libqed:\s*(.*)", title)
    out = th("libqed", 3, version)
    out += [".SH NAME", "libqed \\- " + esc((m.group(1) if m else title).rstrip("."))]
    out += [".SH SYNOPSIS", ".nf", ".B #include <qed.h>", ".PP",
            "Link with \\fI\\-lqed\\fP, or \\fBpkg\\-config \\-\\-cflags \\-\\-libs qed\\fP.", ".fi"]
    out += [".SH DESCRIPTION"]
    for p in paragraphs(overview[1:]):
        hm = re.match(r"([A-Z][A-Za-z ,-]+?)(\s*\([^)]*\))?:(\s+(.*))?$", p)
        if hm and not p.startswith("- "):
            out.append(".SS " + hm.group(1))
            if hm.group(2):
                out += [".PP", line(esc(hm.group(2).strip(" ()").capitalize() + "."))]
            if hm.group(4):
                out += [".PP", line(esc(hm.group(4)[:1].upper() + hm.group(4)[1:]))]
        else:
            out += body_roff([p])
    out += [".SH FUNCTIONS"]
    for _, name, _, doc, _ in sorted(funcs, key=lambda f: f[1]):
        out += [".TP", f".BR {name} (3)", line(esc(summary(doc)))]
    out += [".SH CONSTANTS"]
    for _, name, code, doc, _ in defines:
        out += [".TP", f"\\fB{name}\\fP = {esc(code.split(None, 2)[2])}"]
        out.append(line(esc(" ".join(paragraphs(doc or ["(undocumented)"])))))
    out += [".SH TYPES"]
    for _, name, code, doc, members in types:
        out += [".SS " + name] + type_roff(code, doc, members)
    # The function pages are listed under FUNCTIONS above.
    out += [".SH SEE ALSO", ".BR qed\\-img (1),", ".BR qemu\\-img (1)"]
    pages = {"libqed.3": out}

    # One page per function.
    type_by_name = {t[1]: t for t in types}
    for _, name, proto, doc, _ in funcs:
        secs = split_sections(doc)
        out = th(name, 3, version)
        out += [".SH NAME", f"{name} \\- {esc(summary(doc))}"]
        out += [".SH SYNOPSIS", ".nf", ".B #include <qed.h>", ".PP", synopsis(proto), ".fi"]
        out += [".SH DESCRIPTION"] + body_roff(secs.pop("DESCRIPTION"))
        used = [t for t in re.findall(r"\b(qed_\w+)\b", proto) if t in type_by_name and t != "qed_image"]
        for tname in dict.fromkeys(used):
            _, _, code, tdoc, members = type_by_name[tname]
            out += type_roff(code, tdoc, members, tname)
        for sec in ("RETURN VALUE", "THREAD SAFETY"):
            if sec in secs:
                out += [".SH " + sec] + body_roff(secs.pop(sec))
        for sec, paras in secs.items():
            out += [".SH " + sec] + body_roff(paras)
        others = sorted(set(re.findall(r"\b(qed_\w+)\b", " ".join(doc))) & fnames - {name})
        out += [".SH SEE ALSO"] + [f".BR {n} (3)," for n in others] + [".BR libqed (3)"]
        pages[name + ".3"] = out

    for fname, out in pages.items():
        with open(os.path.join(outdir, fname), "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
    # ninja compares the folder's time with the header's: mark it as new even if no name changed.
    os.utime(outdir)
    return sorted(pages)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    write_pages(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
