"""Presets are written as a base plus differences; every preset of every method file resolves to the values recorded
in tests/data/presets.json before that rewrite: the raw PRESETS entry and the options `train` (and `generate`, where
a preset gives it defaults) parses from it. `python tests/test_presets.py --record` rewrites the record: only when a
preset is meant to change; say so in the commit."""
import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECORD = ROOT / 'tests' / 'data' / 'presets.json'
METHODS = ['patch_diffusion', 'masked_dm', 'relay_diffusion', 'gdd']

def plain(obj):
    """JSON's view of a value (tuples become lists), so that the record and the code compare alike; a long list
    (generate's 50,000 seeds) as its length and hash."""
    obj = json.loads(json.dumps(obj, default=str))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > 64:
        return f'{len(obj)} items, sha256 {hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]}'
    return obj

def resolve(method):
    """{preset: {'preset': the PRESETS entry, 'train': train's parsed options, 'generate': generate's, if it parses
    with only --outdir}} of one method file."""
    mod = __import__(method)
    out = {}
    for name in sorted(mod.PRESETS):
        parser = mod.build_parser(name)
        entry = dict(preset=plain(mod.PRESETS[name]), train=plain(vars(parser.parse_args(['train', f'--preset={name}']))))
        try:
            entry['generate'] = plain(vars(parser.parse_args(['generate', f'--preset={name}', '--outdir=x'])))
        except SystemExit:  # this method's generate takes no --preset, or needs more flags
            pass
        out[name] = entry
    return out

@pytest.mark.parametrize('method', METHODS)
def test_presets_resolve_to_the_recorded_values(method, capsys):
    recorded = json.loads(RECORD.read_text())[method]
    resolved = resolve(method)
    capsys.readouterr()  # argparse's messages for the subcommands that take no --preset
    assert sorted(resolved) == sorted(recorded)
    for name in recorded:
        assert resolved[name] == recorded[name], name

if __name__ == '__main__' and sys.argv[1:] == ['--record']:
    RECORD.write_text(json.dumps({m: resolve(m) for m in METHODS}, indent=1, sort_keys=True) + '\n')
    print(f'wrote {RECORD}')
