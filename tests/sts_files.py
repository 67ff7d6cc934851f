"""A small STS file in GLUE's layout, for the tests that score sentence encoders."""

from __future__ import annotations

GLUE_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
PAIRS = [("A man is eating.", "A man eats food.", 4.2), ("A cat sleeps.", "The stock market fell.", 0.0),
         ("Kids play soccer.", "Children are playing football.", 4.6), ("A dog runs.", "A dog is running.", 5.0),
         ("She sings.", "He reads a book.", 0.8)]


def write_glue_sts(path, pairs=PAIRS):
    rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s:.3f}\n"
            for i, (a, b, s) in enumerate(pairs)]
    path.write_text(GLUE_HEADER + "".join(rows))
    return path


