"""Region label files: YOLO txt and Pascal VOC xml parsing, dispatch and indexing (small files, fast)."""

import re
import warnings

import pytest

from mgfa_ray.data.regions import Box, LabelError, _to_unit, index_labels, parse_label_file, parse_voc_file, parse_yolo_file

CLASSES = ["vein", "contour"]


def esc(path) -> str:
    """``path`` as a literal regular expression (tmp paths contain regex metacharacters such as ``[``)."""
    return re.escape(str(path))


# ---------------------------------------------------------------- YOLO txt


def test_yolo_valid_file_keeps_order_and_values(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.25 0.2 0.1\n\n  1 1 0 1 0.5  \n")  # blank line and padding are ignored
    assert parse_yolo_file(f, num_classes=2) == [Box(0, 0.5, 0.25, 0.2, 0.1), Box(1, 1.0, 0.0, 1.0, 0.5)]
    assert all(b.conf == 1.0 for b in parse_yolo_file(f, num_classes=2))


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "whitespace"])
def test_yolo_empty_or_blank_file_means_no_regions(tmp_path, content):
    f = tmp_path / "e.txt"
    f.write_text(content)
    assert parse_yolo_file(f, num_classes=2) == []


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 fields 'class cx cy w h', got 6"),
    ("0 0.5 0.5 0.2 wide", "coordinates must be numbers"),
    ("x 0.5 0.5 0.2 0.2", "class id must be an integer, got 'x'"),
    ("1.0 0.5 0.5 0.2 0.2", "class id must be an integer, got '1.0'"),
    ("-1 0.5 0.5 0.2 0.2", r"unknown region class -1; allowed 0\.\.1"),
    ("2 0.5 0.5 0.2 0.2", r"unknown region class 2; allowed 0\.\.1"),
    ("0 1.2 0.5 0.2 0.2", r"cx=1.2 outside \[0, 1\]"),
    ("0 0.5 0.5 -0.1 0.2", r"w=-0.1 outside \[0, 1\]"),
    ("0 0.5 0.5 0.2 0", "zero-size box"),
], ids=["4-fields", "6-fields", "non-numeric", "class-x", "class-float", "class-negative", "class-unknown",
        "cx-1.2", "w-negative", "zero-size"])
def test_yolo_bad_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "a.txt"
    f.write_text("1 0.5 0.5 0.4 0.4\n" + line + "\n")
    with pytest.raises(LabelError, match=rf"^{esc(f)}:2: {message}"):
        parse_yolo_file(f, num_classes=2)


def test_yolo_unknown_class_skip_warns_with_file_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0.4 0.4\n5 0.5 0.5 0.2 0.2\n1 0.1 0.2 0.1 0.2\n")
    with pytest.warns(UserWarning, match=rf"^{esc(f)}:2: unknown region class 5.*\(line skipped\)") as record:
        boxes = parse_yolo_file(f, num_classes=2, unknown_class="skip")
    assert len(record) == 1
    assert boxes == [Box(0, 0.5, 0.5, 0.4, 0.4), Box(1, 0.1, 0.2, 0.1, 0.2)]
    # "skip" covers only the class: a malformed line still raises.
    f.write_text("5 0.5 0.5 0.2\n")
    with pytest.raises(LabelError, match=rf"^{esc(f)}:1: expected 5 fields"):
        parse_yolo_file(f, num_classes=2, unknown_class="skip")


# ---------------------------------------------------------------- Pascal VOC xml


def voc(objects: str, size: str = "<size><width>200</width><height>100</height><depth>3</depth></size>") -> str:
    """A VOC document: line 1 ``<annotation>``, line 2 filename, line 3 size, objects from line 4."""
    return f"<annotation>\n<filename>a.jpg</filename>\n{size}\n{objects}</annotation>\n"


def obj(name="vein", xmin="21", ymin="11", xmax="61", ymax="51") -> str:
    """One ``<object>`` over 8 lines: object, name, bndbox, xmin, ymin, xmax, ymax, closing tags."""
    return (f"<object>\n<name>{name}</name>\n<bndbox>\n<xmin>{xmin}</xmin>\n<ymin>{ymin}</ymin>\n"
            f"<xmax>{xmax}</xmax>\n<ymax>{ymax}</ymax>\n</bndbox></object>\n")


def write(tmp_path, text, name="a.xml"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_voc_valid_file_converts_like_ultralytics(tmp_path):
    # W=200, H=100; box 21..61 x 11..51: cx=(41-1)/200, cy=(31-1)/100, w=40/200, h=40/100.
    f = write(tmp_path, voc(obj() + obj("contour", "0", "0", "200", "100")))
    boxes = parse_voc_file(f, classes=CLASSES)
    assert [b.cls for b in boxes] == [0, 1]
    assert (boxes[0].cx, boxes[0].cy, boxes[0].w, boxes[0].h) == pytest.approx((0.2, 0.3, 0.2, 0.4), abs=1e-12)
    assert boxes[0].conf == 1.0
    # A whole-image box: the -1 offset moves its centre to (99/200, 49/100); size exactly 1.
    assert (boxes[1].cx, boxes[1].cy, boxes[1].w, boxes[1].h) == pytest.approx((0.495, 0.49, 1.0, 1.0), abs=1e-12)
    # The class comes from the name's position in `classes`, not from file order; fractional pixels are fine.
    f = write(tmp_path, voc(obj("vein", "20.5", "10.5", "60.5", "50.5")))
    (box,) = parse_voc_file(f, classes=["contour", "vein"])
    assert box.cls == 1 and (box.cx, box.cy) == pytest.approx((39.5 / 200, 29.5 / 100), abs=1e-12)


def test_voc_without_objects_means_no_regions(tmp_path):
    assert parse_voc_file(write(tmp_path, voc("")), classes=CLASSES) == []


@pytest.mark.parametrize("objects, size, line, message", [
    ("", "", 1, "<annotation> has no <size>"),
    ("", "<size><height>100</height></size>", 3, "<size> has no <width>"),
    ("", "<size><width>200</width></size>", 3, "<size> has no <height>"),
    ("", "<size><width>0</width><height>100</height></size>", 3, "image <width> must be positive, got '0'"),
    ("", "<size>\n<width>200</width>\n<height>-5</height></size>", 5, "image <height> must be positive, got '-5'"),
    ("", "<size><width>wide</width><height>100</height></size>", 3, "image <width> must be a number, got 'wide'"),
    ("<object>\n<bndbox/>\n</object>\n", None, 4, "<object> has no <name>"),
    ("<object>\n<name>  </name>\n</object>\n", None, 5, "<object> has an empty <name>"),
    ("<object>\n<name>vein</name>\n</object>\n", None, 4, "<object> has no <bndbox>"),
    (obj().replace("<ymax>51</ymax>", ""), None, 6, "<bndbox> has no <ymax>"),
    (obj(xmax="6l"), None, 9, "box coordinate <xmax> must be a number, got '6l'"),
    (obj(ymin="nan"), None, 8, "box coordinate <ymin> must be a number, got 'nan'"),
    (obj(xmax="250"), None, 9, r"box lies outside the image: xmax=250 not in \[0, 200\] \(image width"),
    (obj(xmin="-1"), None, 7, r"box lies outside the image: xmin=-1 not in \[0, 200\] \(image width"),
    (obj(ymax="100.5"), None, 10, r"box lies outside the image: ymax=100.5 not in \[0, 100\] \(image height"),
    (obj(xmin="61"), None, 6, r"zero-size box \(xmin=61, xmax=61"),
    (obj(ymin="60"), None, 6, r"zero-size box \(.*ymin=60, ymax=51\)"),
    (obj("leaf"), None, 5, r"unknown region class 'leaf'; allowed \['vein', 'contour'\]"),
    (obj(xmin="0", xmax="1"), None, 6, r"converted cx=-0.0025 outside \[0, 1\]"),
], ids=["no-size", "no-width", "no-height", "width-0", "height-negative", "width-text", "no-name", "empty-name",
        "no-bndbox", "no-ymax", "xmax-text", "ymin-nan", "xmax-outside", "xmin-negative", "ymax-outside",
        "zero-width", "inverted-height", "unknown-class", "centre-off-image"])
def test_voc_bad_file_names_file_and_line(tmp_path, objects, size, line, message):
    text = voc(objects) if size is None else voc(objects, size)
    f = write(tmp_path, text)
    with pytest.raises(LabelError, match=rf"^{esc(f)}:{line}: {message}"):
        parse_voc_file(f, classes=CLASSES)


def test_voc_error_line_counts_earlier_objects(tmp_path):
    # Objects start at lines 4, 12, 20: the bad xmax of the third is on line 20 + 5.
    f = write(tmp_path, voc(obj() + obj("contour") + obj(xmax="999")))
    with pytest.raises(LabelError, match=rf"^{esc(f)}:25: box lies outside the image: xmax=999"):
        parse_voc_file(f, classes=CLASSES)


@pytest.mark.parametrize("text, line, message", [
    ("<annotation>\n<size>\n<width>200</width>\n</annotation>\n", 4, "mismatched tag"),
    ("<annotation>\n<size><width>200</width><height>100</height></size>\n", 3, "no element found"),
    ("", 1, "no element found"),
    ("<annotation>\n</annotation>\n<extra/>\n", 3, "junk after document element"),
], ids=["mismatched", "unclosed", "empty-file", "two-roots"])
def test_voc_malformed_xml_reports_parser_line(tmp_path, text, line, message):
    f = write(tmp_path, text)
    with pytest.raises(LabelError, match=rf"^{esc(f)}:{line}: malformed XML: {message}"):
        parse_voc_file(f, classes=CLASSES)


def test_voc_root_must_be_annotation(tmp_path):
    f = write(tmp_path, "<?xml version='1.0'?>\n<annotations>\n</annotations>\n")
    with pytest.raises(LabelError, match=rf"^{esc(f)}:2: root element must be <annotation>, got <annotations>"):
        parse_voc_file(f, classes=CLASSES)


def test_voc_unknown_class_skip_warns_and_drops_object(tmp_path):
    f = write(tmp_path, voc(obj("leaf", xmax="999") + obj("contour")))
    with pytest.warns(UserWarning, match=rf"^{esc(f)}:5: unknown region class 'leaf'.*\(object skipped\)") as record:
        boxes = parse_voc_file(f, classes=CLASSES, unknown_class="skip")
    assert len(record) == 1
    assert [b.cls for b in boxes] == [1] and boxes[0].cx == pytest.approx(0.2)
    # Skipping covers only the class: a known object with a bad box still raises.
    f = write(tmp_path, voc(obj("leaf") + obj("vein", xmax="999")))
    with pytest.warns(UserWarning, match="'leaf'"), pytest.raises(LabelError, match=rf"^{esc(f)}:17: box lies outside"):
        parse_voc_file(f, classes=CLASSES, unknown_class="skip")


def test_voc_policy_and_class_list_are_checked(tmp_path):
    f = write(tmp_path, voc(obj()))
    with pytest.raises(ValueError, match="unknown_class must be 'error' or 'skip', got 'ignore'"):
        parse_voc_file(f, classes=CLASSES, unknown_class="ignore")
    with pytest.raises(ValueError, match="must be unique"):
        parse_voc_file(f, classes=["vein", "vein"])


def test_converted_coordinates_clip_only_float_noise():
    assert _to_unit(0.5, "cx", "f:1") == 0.5
    assert _to_unit(-5e-10, "cx", "f:1") == 0.0
    assert _to_unit(1 + 5e-10, "w", "f:1") == 1.0
    with pytest.raises(LabelError, match=r"^f:1: converted cx=-2e-09 outside \[0, 1\]"):
        _to_unit(-2e-9, "cx", "f:1")
    with pytest.raises(LabelError, match=r"^f:1: converted h=1.00001 outside"):
        _to_unit(1.00001, "h", "f:1")


# ---------------------------------------------------------------- dispatch and index


def test_parse_label_file_dispatches_on_suffix(tmp_path):
    txt = write(tmp_path, "1 0.2 0.3 0.2 0.4\n", "a.txt")
    xml = write(tmp_path, voc(obj("contour")), "b.xml")
    expected = [Box(1, 0.2, 0.3, 0.2, 0.4)]
    assert parse_label_file(txt, classes=CLASSES) == expected
    (box,) = parse_label_file(xml, classes=CLASSES)
    assert box.cls == 1 and (box.cx, box.cy, box.w, box.h) == pytest.approx((0.2, 0.3, 0.2, 0.4), abs=1e-12)
    # num_classes comes from len(classes): id 1 is unknown with one class.
    with pytest.raises(LabelError, match=rf"^{esc(txt)}:1: unknown region class 1; allowed 0\.\.0"):
        parse_label_file(txt, classes=["vein"])
    with pytest.warns(UserWarning, match=rf"^{esc(txt)}:1:"):
        assert parse_label_file(txt, classes=["vein"], unknown_class="skip") == []
    with pytest.warns(UserWarning, match=rf"^{esc(xml)}:5: unknown region class 'contour'"):
        assert parse_label_file(xml, classes=["vein"], unknown_class="skip") == []


@pytest.mark.parametrize("name", ["a.json", "a.XML", "a"])
def test_parse_label_file_rejects_other_suffixes(tmp_path, name):
    f = write(tmp_path, "0 0.5 0.5 0.2 0.2\n", name)
    with pytest.raises(LabelError, match=rf"^{esc(f)}: unsupported label file suffix .*allowed \.txt .* or \.xml"):
        parse_label_file(f, classes=CLASSES)


def test_index_labels_mixes_txt_and_xml(tmp_path):
    (tmp_path / "maple").mkdir()
    write(tmp_path, "", "maple/m1.txt")
    write(tmp_path, voc(""), "maple/m2.xml")
    write(tmp_path, "", "47_6_test.txt")
    write(tmp_path, voc(""), "47_5_train.xml")
    write(tmp_path, "x", ".DS_Store")
    write(tmp_path, "x", "maple/m1.jpg")
    ids = index_labels(tmp_path)
    assert ids == {"47_5": tmp_path / "47_5_train.xml", "47_6": tmp_path / "47_6_test.txt",
                   "maple/m1": tmp_path / "maple" / "m1.txt", "maple/m2": tmp_path / "maple" / "m2.xml"}
    assert list(ids) == ["47_5", "47_6", "maple/m1", "maple/m2"]  # sorted by file path
    assert all(parse_label_file(p, classes=CLASSES) == [] for p in ids.values())


@pytest.mark.parametrize("first, second", [("a.txt", "a.xml"), ("a.txt", "a_train.txt"), ("a_test.xml", "a.txt")])
def test_index_labels_rejects_two_files_for_one_image(tmp_path, first, second):
    write(tmp_path, "", first)
    write(tmp_path, "", second)
    with pytest.raises(LabelError, match="two label files for image 'a'") as err:
        index_labels(tmp_path)
    assert str(tmp_path / first) in str(err.value) and str(tmp_path / second) in str(err.value)


def test_index_labels_missing_or_empty_directory(tmp_path):
    with pytest.raises(LabelError, match="label directory does not exist"):
        index_labels(tmp_path / "nope")
    write(tmp_path, "x", "notes.md")
    with pytest.raises(LabelError, match=rf"^{esc(tmp_path)}: no label files \(\.txt or \.xml\)"):
        index_labels(tmp_path)


# ---------------------------------------------------------------- real data


def test_real_cotton_labels_three_class_16_lines(data_root):
    """UFG Cotton: 480 YOLO files, one region class; 47_6_test.txt holds the only three class-16 lines."""
    labels = index_labels(data_root / "ufg-regions" / "cotton")
    assert len(labels) == 480 and {p.suffix for p in labels.values()} == {".txt"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        boxes = {i: parse_label_file(p, classes=["region"], unknown_class="skip") for i, p in labels.items()}
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and all(issubclass(w.category, UserWarning) for w in record)
    assert [m.split(": ")[0].rsplit("/", 1)[-1] for m in messages] == [f"47_6_test.txt:{n}" for n in (1, 2, 3)]
    assert all("unknown region class 16" in m for m in messages)
    assert boxes["47_6"] == [] and sum(map(len, boxes.values())) == 1437
    assert all(b.cls == 0 and 0 <= min(b.cx, b.cy) and max(b.cx, b.cy) <= 1 and 0 < b.w <= 1 and 0 < b.h <= 1
               for bs in boxes.values() for b in bs)
    failing = []
    for p in labels.values():
        try:
            parse_label_file(p, classes=["region"])
        except LabelError as e:
            failing.append(str(e))
    assert len(failing) == 1 and re.match(rf"^{esc(labels['47_6'])}:1: unknown region class 16", failing[0])
