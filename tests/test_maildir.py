"""Maildir++ files: delivery, names, flags, keywords, UIDVALIDITY, folder-name encoding."""

from __future__ import annotations

import os

import pytest

from tmmail import maildir, store_names


def test_create_is_idempotent_and_complete(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root)
    maildir.create(root)
    for sub in ("cur", "new", "tmp"):
        assert os.path.isdir(os.path.join(root, sub))
        for folder in maildir.SPECIAL_FOLDERS:
            assert os.path.isdir(os.path.join(root, "." + folder, sub))
    assert os.path.exists(os.path.join(root, ".Trash", "maildirfolder"))


def test_deliver_names_sizes_and_folders(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root, folders=("Junk",))
    src = tmp_path / "m"
    src.write_bytes(b"a\nb\n")
    name = maildir.deliver(root, str(src), prefix=b"X: y\n")
    assert name.endswith(",S=9,W=12")
    with open(os.path.join(root, "new", name), "rb") as f:
        assert f.read() == b"X: y\na\nb\n"
    assert maildir.sizes_from_base(name) == (9, 12)
    junk = maildir.deliver(root, str(src), folder="Junk")
    assert os.path.exists(os.path.join(root, ".Junk", "new", junk))
    assert not os.listdir(os.path.join(root, "tmp"))


def test_name_helpers():
    assert maildir.split_name("123.M1P2.h,S=5:2,RS") == ("123.M1P2.h,S=5", "RS")
    assert maildir.split_name("123.M1P2.h") == ("123.M1P2.h", "")
    assert maildir.make_name("b", "aSRbS") == "b:2,RSab"
    assert maildir.sizes_from_base("1.M2.host,S=7") == (7, None)
    assert maildir.name_time("1700000000.M1P2.h") == 1700000000.000001
    assert maildir.name_time("1700000000.M250000P2Q1.h") == 1700000000.25


def test_keywords_file(tmp_path):
    folder = str(tmp_path)
    assert maildir.read_keywords(folder) == []
    assert maildir.add_keywords(folder, ["$Junk", "Work"]) == ["$Junk", "Work"]
    assert maildir.add_keywords(folder, ["work", "Later"]) == ["$Junk", "Work", "Later"]
    assert (tmp_path / "dovecot-keywords").read_text() == "0 $Junk\n1 Work\n2 Later\n"
    with pytest.raises(OverflowError):
        maildir.add_keywords(folder, [f"k{i}" for i in range(30)])


def test_uidvalidity_never_repeats(tmp_path):
    values = [maildir.allocate_uidvalidity(str(tmp_path)) for _ in range(5)]
    assert values == sorted(set(values))
    # Dovecot's file: next value in hex
    assert int((tmp_path / "dovecot-uidvalidity").read_text(), 16) == values[-1] + 1


@pytest.mark.parametrize("text,encoded", [
    ("Sent", "Sent"), ("Café", "Caf&AOk-"), ("A&B", "A&-B"), ("日本語", "&ZeVnLIqe-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
])
def test_modified_utf7(text, encoded):
    assert store_names.utf7_encode(text) == encoded
    assert store_names.utf7_decode(encoded) == text


@pytest.mark.parametrize("bad", ["&", "&Jjo", "&AGE-", "&;;-", "é"])
def test_modified_utf7_malformed(bad):
    with pytest.raises(store_names.InvalidName):
        store_names.utf7_decode(bad)


def test_folder_dir_mapping():
    assert store_names.folder_to_dir("Work/Projects") == ".Work.Projects"
    assert store_names.dir_to_folder(".Work.Projects") == "Work/Projects"
    assert store_names.dir_to_folder(".Caf&AOk-") == "Café"
    for not_folder in ("..", ".", "..DOVECOT-TRASHED", ".a..b", ".x."):
        assert store_names.dir_to_folder(not_folder) is None


def test_deliver_with_delivery_id_is_idempotent(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root, folders=())
    src = tmp_path / "m"
    src.write_bytes(b"Subject: once\n\nx\n")
    first = maildir.deliver(root, str(src), delivery_id="Q123 alice@example.com")
    # a crash after the rename: the queue delivers again
    again = maildir.deliver(root, str(src), delivery_id="Q123 alice@example.com")
    assert again == first
    assert os.listdir(os.path.join(root, "new")) == [first]
    # also after an IMAP client moved it to cur/ with flags
    os.rename(os.path.join(root, "new", first), os.path.join(root, "cur", first + ":2,S"))
    assert maildir.deliver(root, str(src), delivery_id="Q123 alice@example.com") == first + ":2,S"
    other = maildir.deliver(root, str(src), delivery_id="Q123 bob@example.com")
    assert other != first and sorted(os.listdir(os.path.join(root, "new"))) == [other]
    assert maildir.sizes_from_base(other) == (17, 20)


def _served(data: bytes) -> bytes:
    """What IMAP sends for stored bytes (the IMAP layer's own conversion)."""
    from tmmail.imap.mime import to_crlf

    return to_crlf(data)


def test_crlf_size_counts_a_crlf_split_between_read_chunks(tmp_path):
    # a foreign (CRLF) file whose CR is the last byte of the first 64 KiB read and LF the first
    # of the second: it is one line end, already CRLF, and must not be counted as a bare LF
    data = b"x" * ((1 << 16) - 1) + b"\r\n" + b"tail\r\nlf only\n"
    path = tmp_path / "msg"
    path.write_bytes(data)
    assert maildir.crlf_size(str(path)) == len(_served(data)) == len(data) + 1
    # any cut gives the same count
    for cut in range(len(data) - 20, len(data)):
        sizer = maildir.WireSizer()
        sizer.feed(data[:cut])
        sizer.feed(data[cut:])
        assert sizer.size == len(_served(data))


def test_new_messages_get_uids_in_delivery_order(tmp_path):
    """Same second: microseconds and the Q counter compare as numbers, not as strings."""
    from tmmail.store import Store

    root = str(tmp_path / "Maildir")
    maildir.create(root, folders=())
    # in delivery order; string order would be M1000 < M20 < M999 and Q10 < Q9
    order = ["1700000000.M20P7Q1.h", "1700000000.M999P7Q2.h", "1700000000.M1000P7Q3.h",
             "1700000000.M1000P7Q9.h", "1700000000.M1000P7Q10.h", "1700000001.M5P7Q11.h"]
    for i, base in enumerate(reversed(order)):  # created in another order than delivered
        (tmp_path / "Maildir" / "new" / f"{base},S=2,W=3").write_bytes(b"%d\n" % i)
    folder = Store(root).open("INBOX", readonly=True)
    assert [m.base.split(",")[0] for m in folder.messages] == order
    assert [m.uid for m in folder.messages] == [1, 2, 3, 4, 5, 6]
    # names delivered by maildir.deliver within one second keep their order too
    src = tmp_path / "m"
    src.write_bytes(b"x\n")
    names = [maildir.deliver(root, str(src)) for _ in range(30)]
    folder.refresh()
    assert [m.base for m in folder.messages[6:]] == [n for n in names]


def test_sorting_many_names_agrees_with_the_delivery_order_key():
    """The bulk sort used for a cold folder orders our names, Dovecot's and foreign ones alike."""
    names = ["1700000000.M1000P7Q3.h", "1700000000.M999P7Q2.h", "1700000000.M20P7Q1.h",
             "1700000000.M1000P7Q10.h", "1700000000.M1000P7Q9.h",
             "1700000000.M5P9V0000000000000801I0000000000123456_0.dovecot,S=4",  # no Q counter
             "1700000000.M5Q2P9.odd", "1700000000.12345_1.courier", "cur-style-without-time",
             "1700000001.M5P7Q11.h", "1699999999.x"]
    expected = sorted(names, key=maildir.delivery_order)
    assert maildir.sort_delivery_order(names) == expected
    assert expected[0] == "cur-style-without-time" and expected[-1] == "1700000001.M5P7Q11.h"
    assert expected.index("1700000000.M999P7Q2.h") < expected.index("1700000000.M1000P7Q3.h")
