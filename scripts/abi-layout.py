#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Layout check for the size-prefixed structs (qed.h, "Structs that grow"), from two abidw XML
files: every field of the baseline's struct must keep its name, offset, type and size in the
new library; new fields may only follow the baseline's last byte. abidiff cannot tell an
appended field (compatible by our rule) from other changes of these structs, so scripts/abi-check
has abidiff ignore them (--list prints the suppression) and relies on this check instead.

    abi-layout.py BASELINE.abi NEW.abi    check
    abi-layout.py --list BASELINE.abi     print a libabigail suppression for those structs
"""
import sys
import xml.etree.ElementTree as ET


def load(path):
    root = ET.parse(path).getroot()
    by_id = {}
    for el in root.iter():
        if "id" in el.attrib:
            by_id[el.attrib["id"]] = el
    return root, by_id


def type_name(by_id, tid, depth=0):
    el = by_id.get(tid)
    if el is None or depth > 20:
        return tid
    tag, a = el.tag, el.attrib
    if tag in ("pointer-type-def", "reference-type-def", "qualified-type-def"):
        mark = {"pointer-type-def": "*", "reference-type-def": "&", "qualified-type-def": "const "}[tag]
        return mark + type_name(by_id, a.get("type-id"), depth + 1)
    if tag == "function-type":
        params = [type_name(by_id, p.attrib.get("type-id"), depth + 1)
                  for p in el.findall("parameter") if "type-id" in p.attrib]
        ret = el.find("return")
        r = type_name(by_id, ret.attrib.get("type-id"), depth + 1) if ret is not None else "void"
        return "fn(%s) -> %s" % (", ".join(params), r)
    return "%s/%s" % (a.get("name", tag), a.get("size-in-bits", "?"))


def sized_structs(root, by_id):
    """name -> (size in bits, [(field, offset, type)]) for structs that begin with struct_size."""
    out = {}
    for cls in root.iter("class-decl"):
        name = cls.attrib.get("name", "")
        if not name.startswith("qed_") or cls.attrib.get("is-declaration-only") == "yes":
            continue
        fields = []
        for dm in cls.findall("data-member"):
            var = dm.find("var-decl")
            fields.append((var.attrib["name"], int(dm.attrib.get("layout-offset-in-bits", "0")),
                           type_name(by_id, var.attrib.get("type-id"))))
        if fields and fields[0][0] == "struct_size" and fields[0][1] == 0:
            out[name] = (int(cls.attrib.get("size-in-bits", "0")), fields)
    return out


def main(argv):
    if len(argv) == 3 and argv[1] == "--list":
        names = sorted(sized_structs(*load(argv[2])))
        print("[suppress_type]\n  name_regexp = (^|::)(%s)$" % "|".join(names))
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    old = sized_structs(*load(argv[1]))
    new = sized_structs(*load(argv[2]))
    bad = 0
    for name, (size, fields) in sorted(old.items()):
        if name not in new:
            print("abi-layout: struct %s is gone" % name)
            bad = 1
            continue
        nsize, nfields = new[name]
        have = {f[0]: f for f in nfields}
        for f in fields:
            g = have.get(f[0])
            if g != f:
                print("abi-layout: %s.%s was at bit %d as %s, now %s" % (
                    name, f[0], f[1], f[2], "missing" if g is None else "at bit %d as %s" % (g[1], g[2])))
                bad = 1
        for g in nfields:
            if g[0] not in {f[0] for f in fields}:
                if g[1] < size:
                    # Even the old struct's tail padding is out of bounds: an old caller may
                    # leave garbage there, which a new library would read as the new field.
                    print("abi-layout: %s.%s was inserted at bit %d, inside the old struct (%d bits,"
                          " counting its tail padding); append after it" % (name, g[0], g[1], size))
                    bad = 1
                else:
                    print("abi-layout: %s.%s appended at bit %d (compatible)" % (name, g[0], g[1]))
    for name in sorted(set(new) - set(old)):
        print("abi-layout: new struct %s" % name)
    if not bad:
        print("abi-layout: %d size-prefixed structs keep their layout" % len(old))
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv))
