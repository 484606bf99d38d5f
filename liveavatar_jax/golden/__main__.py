"""python -m liveavatar_jax.golden DIR [DIR ...]: check fixtures of the official code against our implementation."""

import argparse
import sys

from liveavatar_jax.golden import FixtureError, run_fixture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveavatar_jax.golden", description=__doc__)
    parser.add_argument("dirs", nargs="+", help="fixture folders (each with manifest.json)")
    args = parser.parse_args(argv)
    total = failed = 0
    bad_fixtures = []
    for d in args.dirs:
        try:
            fixture, rows = run_fixture(d)
        except FixtureError as e:
            print(f"ERROR {e}")
            bad_fixtures.append(d)
            continue
        print(f"== {d} (kind {fixture.kind})")
        for row in rows:
            print(row.line())
        total += len(rows)
        failed += sum(not r.ok for r in rows)
    ok = failed == 0 and not bad_fixtures and total > 0
    print(f"{'PASS' if ok else 'FAIL'}: {total - failed}/{total} outputs within tolerance"
          + (f", {len(bad_fixtures)} fixture(s) could not be run" if bad_fixtures else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
