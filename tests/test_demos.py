"""The README's CPU demos: every demo preset exists, parses, and its first step runs through the real train command
(shortened to one step; the demos' sample quality is measured in the docs, never here)."""
import json
from pathlib import Path

import pytest

import common
import gdd
import masked_dm as md
import patch_diffusion as pd
import relay_diffusion as rd

def first_step(module, argv, outdir):
    args = common.parse_command_line(module.build_parser, argv + [f'--outdir={outdir}', '--nosubdir', '--grid=0'])
    module.train(args)
    stats = [json.loads(line) for line in open(Path(outdir) / 'stats.jsonl')]
    assert stats[0]['step'] == 1 and all(v == v for v in stats[0].values() if isinstance(v, float))  # finite
    return args

@pytest.mark.parametrize('module, argv', [
    (pd, ['train', '--preset=demo', '--duration=0.00006']),                  # Patch Diffusion (p = 0.5)
    (pd, ['train', '--preset=demo', '--real_p=1', '--duration=0.000032']),    # its EDM baseline, GDD's teacher
    (md, ['train', '--preset=demo_pre', '--train_steps=1']),
    (md, ['train', '--preset=demo_ft', '--train_steps=1']),
    (rd, ['train', '--preset=demo8', '--duration=0.000032']),
    (rd, ['train', '--preset=demo16', '--duration=0.000032']),
], ids=['patch', 'edm', 'masked_pre', 'masked_ft', 'relay_one', 'relay_two'])
def test_demo_preset_first_step(tmp_path, module, argv):
    args = first_step(module, argv, tmp_path)
    assert args.data.startswith('demo-') and args.preset in argv[1]

def test_gdd_demo_first_step_from_the_patch_demo_teacher(tmp_path):
    first_step(pd, ['train', '--preset=demo', '--real_p=1', '--duration=0.000032'], tmp_path / 'teacher')
    args = first_step(gdd, ['train', '--preset=demo', f'--transfer={tmp_path / "teacher"}', '--duration=0.000016'],
                      tmp_path / 'gdd')
    assert args.freeze == 0 and args.backbone == 'teacher'  # GDD against the teacher's own features
