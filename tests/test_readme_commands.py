"""Every command that README.md and docs/*.md print either runs as printed, or is skipped for a stated reason.

Extraction (`extract`): in fenced code blocks, every command line (`python ...`, `$ python ...`, `torchrun ...`,
an `ENV=value python ...` prefix, a shell loop that runs python), with `\\` continuations joined, a multi-line
`python -c "..."` up to its closing quote and a `python - <<'EOF'` here-document up to `EOF`; in a block that holds
`$ ` prompts only the prompted lines are commands (the rest is output). Outside code blocks, inline code spans that
start with `python ` (e.g. the README's `python fid.py score --images=out --data=demo-16`) are commands too.

Classification (`RULES`, first match wins): every command is either RUN (cheap: `--help`/`-h`, a `train -n` dry
run, a short script on the meta device), or SKIP with the rule's reason. A command that no rule matches FAILS
(`test_every_command_is_classified`), so a new README command is never silently ignored: add a rule for it.

Running (`test_command`): in a fresh directory holding only the seven top-level .py files (what a fresh clone
offers a user), with OMP_NUM_THREADS=1, through `bash -o pipefail -c`; the command must exit 0 with no
"Traceback" on stderr. The selected commands are started together when the first is needed, two at a time (each is
one single-threaded process; the suite is sized for 2 cores), and each test checks its own; a command printed in
several places (the same text) runs once, in one fresh clone, for all of them. A command that reads a path (--network, --resume, --data, --images, ...) which another
command of the same file writes (--outdir, --dest) runs only if that command runs too (it is then run first, in
the same directory); otherwise it is skipped, naming the writer and why the writer is skipped. A path that no
command writes and that is not in a fresh clone is not a dependency: the command runs and fails, as a user's would.

Commands that fail as printed today are listed in XFAIL (strict): when the code or the doc is fixed the test
XPASSes and fails, telling whoever fixed it to delete the entry.

Rule for `dataset_tool.py`: a conversion runs only if its --source exists in a fresh clone or is written by a
command that runs; sources under downloads/ are downloads (skipped). Absolute /tmp paths are never run: the doc's
transcript writes there, and a test writes only inside its own directory (the same flows are tests in
tests/test_faults.py, tests/test_dataset_tool.py and tests/test_masked_dm.py).

An error message's advice is a printed command too: `test_suggested_data_demo_is_accepted` checks that where a
missing dataset's message says "use --data=demo", that command takes --data=demo.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ['README.md', *sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'docs').glob('*.md'))]
SCRIPTS = ['common.py', 'dataset_tool.py', 'fid.py', 'gdd.py', 'masked_dm.py', 'patch_diffusion.py', 'relay_diffusion.py']
TIMEOUT = 300   # seconds per command: each RUN command takes a few seconds of CPU, but the machine is shared
WORKERS = 2     # commands run at once (test_command): the 2 cores of the machine the suite is sized for

#------------------------------------------------------------------------------
# Extraction.

class Command:
    def __init__(self, file, line, text):
        self.file, self.line, self.text = file, line, text
        self.id = f'{file}:{line}'

    def __repr__(self):
        return f'{self.id}: {self.text}'

_PYTHON_WORD = re.compile(r'(^|[\s;(&|])(python|torchrun)(\s|$)')
_ENV_PREFIX = re.compile(r'^([A-Z_][A-Z0-9_]*=\S*\s+)+')

def _is_command(line):
    """A command line of a fenced block without prompts: python/torchrun, possibly after ENV=value assignments."""
    return re.match(r'(python|torchrun)(\s|$)', _ENV_PREFIX.sub('', line)) is not None

def _collect(lines, i, first):
    """The full command starting at lines[i] (text `first`): continuations, `python -c "` and here-documents.
    Returns (text, index of the command's last line)."""
    text = first
    heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
    if heredoc:
        end = heredoc.group(1)
        while i + 1 < len(lines) and lines[i + 1].strip() != end:
            i += 1
            text += '\n' + lines[i]
        return text + '\n' + end, i + 1
    while text.endswith('\\') and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + ' ' + lines[i].strip()
    while _open_quote(text) and i + 1 < len(lines):
        i += 1
        text += '\n' + lines[i]
    return text, i

def _open_quote(text):
    try:
        shlex.split(text, comments=True)
        return False
    except ValueError:
        return True

def extract(file):
    """The commands of one markdown file, in order."""
    lines = (ROOT / file).read_text().split('\n')
    commands, i = [], 0
    while i < len(lines):
        fence = re.match(r'(\s*)```', lines[i])
        if fence:   # a fenced block: lines[i + 1 : j]
            indent, j = len(fence.group(1)), i + 1
            while j < len(lines) and not re.match(r'\s*```', lines[j]):
                j += 1
            body = [line[indent:] if line[:indent].strip() == '' else line for line in lines[i + 1:j]]
            prompted = any(line.startswith('$ ') for line in body)
            k = 0
            while k < len(body):
                line = body[k]
                if prompted and line.startswith('$ ') and _PYTHON_WORD.search(line[2:]):
                    start = k
                    text, k = _collect(body, k, line[2:].rstrip())
                    commands.append(Command(file, i + 2 + start, text))
                elif not prompted and _is_command(line):
                    start = k
                    text, k = _collect(body, k, line.rstrip())
                    commands.append(Command(file, i + 2 + start, text))
                k += 1
            i = j + 1
            continue
        for span in re.findall(r'`([^`]+)`', lines[i]):
            if re.match(r'(\w+=\S+\s+)*python\s', span):
                commands.append(Command(file, i + 1, span.strip()))
        i += 1
    seen = {}
    for c in commands:   # two commands on one line (inline spans): the second is FILE:LINE-2
        seen[c.id] = seen.get(c.id, 0) + 1
        if seen[c.id] > 1:
            c.id += f'-{seen[c.id]}'
    return commands

COMMANDS = [c for file in DOCS for c in extract(file)]

#------------------------------------------------------------------------------
# Paths a command reads and writes; a reader depends on the latest earlier writer of the same file.

READ_FLAGS = ('network', 'network_first', 'network_second', 'resume', 'transfer', 'pretrained_model_ckpt', 'images',
              'data', 'source', 'ref', 'vae', 'indir', 'detector')
WRITE_FLAGS = ('outdir', 'dest', 'grid')

def _flag_values(text, flags):
    return [m.group(2) for m in re.finditer(r'--(%s)=(\S+)' % '|'.join(flags), text)]

def reads(c):
    return [p.strip('\'"') for p in _flag_values(c.text, READ_FLAGS)
            if not re.fullmatch(r'demo(-\d+)?', p) and '://' not in p and not p.isdigit()]

def writes(c):
    paths = [p.strip('\'"') for p in _flag_values(c.text, WRITE_FLAGS) if not p.isdigit()]
    if re.match(r'python -c', c.text):   # a script that saves a file: torch.save(..., 'tiny-vae.bin')
        paths += re.findall(r"save\(.*?'([^']+)'\)", c.text)
    return paths

def _related(a, b):
    a, b = a.rstrip('/'), b.rstrip('/')
    return a == b or a.startswith(b + '/') or b.startswith(a + '/')

def dependencies(c):
    """[(path, writer)]: for each path c reads, the latest earlier command of the same file that writes it (or a
    folder above or below it). A fresh clone holds only the seven .py files, so no read path is there already."""
    deps = []
    for path in reads(c):
        earlier = [w for w in COMMANDS if w.file == c.file and w.line < c.line and any(_related(path, p) for p in writes(w))]
        if earlier:
            deps.append((path, earlier[-1]))
    return deps

#------------------------------------------------------------------------------
# Classification. First match wins. RUN rules are the cheap commands (a few seconds of CPU each).

RUN, SKIP = 'run', 'skip'
RULES = [
    # (regex searched in the command, RUN or the reason it is skipped)
    (r'^torchrun\s', 'torchrun: multi-process, sized for 4-8 GPUs'),
    (r'^python -m pytest\b', 'runs the test suite (this file is part of it)'),
    (r'^python -m pytorch_fid\b', "the third-party pytorch-fid package's command, not this project's"),
    (r'(^|\s)(\w+=\S+\s+)*python tests/', 'a benchmark or the GPU check in tests/: minutes of CPU or a CUDA device '
                                            '(docs/testing.md); not one of the seven top-level files'),
    (r'''(^|[\s='"(])/tmp/''', "a measured transcript on absolute /tmp paths: a test writes only inside its own "
                                "directory (these flows are tests in tests/test_faults.py, test_dataset_tool.py, "
                                "test_masked_dm.py, test_fid.py)"),
    (r'(^|\s)\.\.\.', "abbreviated in the doc ('...'): not runnable as printed"),
    (r'\s(--help|-h)(\s|$)', RUN),
    (r'^python \w+\.py train\b.*\s(-n|--dry-run)(\s|$)', RUN),
    (r"^python - <<'EOF'\n(.|\n)*torch\.device\('meta'\)", RUN),      # shapes on the meta device, seconds
    (r"^python -c \"import torch, patch_diffusion as pd; .*AutoencoderKL\(block_out_channels=\(32, 32, 32\)", RUN),
    (r'^python patch_diffusion\.py encode --data=demo-32 .*--vae=tiny-vae\.bin', RUN),   # 4096 images, ~8 s
    (r'^python dataset_tool\.py grid --data=demo-\d+ .*--num=\d{1,3}(\s|$)', RUN),   # a grid of demo images, seconds
    (r'--source=downloads/', 'needs a download (the original dataset files under downloads/)'),
    (r'--data=datasets/', 'needs a dataset made from a download (docs/evaluation.md)'),
    (r'--(network|network_first|network_second|transfer)=(all_ckpt|pretrained|ckpts)/', 'needs a downloaded checkpoint'),
    (r'\strain\s.*--preset=demo', 'trains for minutes on a CPU (the demo presets: 4-12 minutes on 2 cores)'),
    (r'\strain\s.*--data=demo32-latents', 'trains 10 kimg of latents (about a minute of CPU)'),
    (r'--network=(training-runs/\d{5}-|runs/)', "needs the run of a README demo (trains for minutes)"),
]

# Commands that fail as printed today (exact text: a doc edit makes the entry stale, which fails too). They are run
# whatever the rules say; strict xfail: once fixed, the XPASS fails and tells you to delete the entry.
XFAIL = {}

def classify(c):
    """(RUN, '') to run it, (SKIP, reason) to skip it, (None, why) when no rule matches; XFAIL entries run."""
    if (c.file, c.text) in XFAIL:
        return RUN, ''
    action = next((action for pattern, action in RULES if re.search(pattern, c.text)), None)
    if action not in (None, RUN):
        return SKIP, action
    for path, writer in dependencies(c):
        verdict, reason = classify(writer)
        if verdict != RUN:
            root = reason.split(' which is skipped: ')[-1] if verdict == SKIP else 'unclassified'
            return SKIP, f'reads {path}, written by {writer.id}, which is skipped: {root}'
    if action is None:
        return None, 'no rule in RULES matches: add a RUN rule (if cheap) or a skip rule with its reason'
    return RUN, ''

def _runnable_chain(c):
    """The commands to run in order for c: its RUN dependencies first."""
    chain = []
    for _, writer in dependencies(c):
        if classify(writer)[0] == RUN:
            chain += [w for w in _runnable_chain(writer) if w not in chain]
    return chain + [c]

#------------------------------------------------------------------------------
# Tests.

def fresh_clone(tmp_path):
    """The seven top-level .py files and nothing else, as a user's fresh clone offers them."""
    for name in SCRIPTS:
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path

def run_as_printed(text, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    env.pop('PYTHONPATH', None)
    return subprocess.run(['bash', '-o', 'pipefail', '-c', text], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)

def _params():
    params = []
    for c in COMMANDS:
        marks = []
        if (c.file, c.text) in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[c.file, c.text] + ' (fixed? delete its XFAIL entry)'))
        params.append(pytest.param(c, id=c.id, marks=marks))
    return params

def run_chain(texts, cwd):
    """[CompletedProcess] of the commands `texts`, run in order in a fresh clone at cwd; stops at the first failure."""
    fresh_clone(cwd)
    done = []
    for text in texts:
        done.append(run_as_printed(text, cwd))
        if done[-1].returncode != 0:
            break
    return done

@pytest.fixture(scope='module')
def started(request, tmp_path_factory):
    """{command id: future of run_chain}: every RUN command that this session selected, started when the first one is
    needed, WORKERS at a time (each is a single-threaded process: the second core works while the first waits). A
    command printed in several places (the same text, so the same run in the same fresh clone) runs once for all."""
    commands = [item.callspec.params['command'] for item in request.session.items
                if item.module is request.module and getattr(item, 'originalname', '') == 'test_command']
    with ThreadPoolExecutor(WORKERS) as pool:
        futures, by_texts = {}, {}
        for c in commands:
            if classify(c)[0] == RUN:
                texts = tuple(w.text for w in _runnable_chain(c))
                if texts not in by_texts:
                    by_texts[texts] = pool.submit(run_chain, texts, tmp_path_factory.mktemp('clone'))
                futures[c.id] = by_texts[texts]
        yield futures
        for future in futures.values():
            future.cancel()

@pytest.mark.parametrize('command', _params())
def test_command(command, started):
    verdict, why = classify(command)
    if verdict is None:
        pytest.fail(f'{command.id}: {why}:\n{command.text}')
    if verdict == SKIP:
        pytest.skip(why)
    for c, r in zip(_runnable_chain(command), started[command.id].result()):
        where = command.id if c is command else f'{c.id} (run first: {command.id} reads what it writes)'
        detail = f'{where}: exit {r.returncode}\n$ {c.text}\n{r.stdout[-2000:]}{r.stderr[-3000:]}'
        assert r.returncode == 0, detail
        assert 'Traceback' not in r.stderr, detail

def test_every_command_is_classified():
    unclassified = [f'{c.id}: {c.text}' for c in COMMANDS if classify(c)[0] is None]
    assert not unclassified, 'commands that no rule in RULES matches:\n' + '\n'.join(unclassified)

def test_xfail_entries_are_current():
    texts = {(c.file, c.text) for c in COMMANDS}
    stale = [key for key in XFAIL if key not in texts]
    assert not stale, f'XFAIL entries whose command is no longer printed (delete them): {stale}'

def test_extraction_finds_the_commands():
    """The extractor itself: prompted lines only, continuations joined, here-documents whole, torchrun counted."""
    readme = [c.text for c in COMMANDS if c.file == 'README.md']
    assert 'python patch_diffusion.py train --preset=demo --outdir=training-runs --metrics=toy_fd' in readme
    assert ('python masked_dm.py train --preset=demo_ft --outdir=runs/masked-ft --pretrained_model_ckpt=runs/masked-pre '
            '--metrics=toy_fd') in readme  # a continuation line, joined
    assert not any('\n' in c.text and not re.match(r"python (-c|- <<)", c.text) for c in COMMANDS)
    assert any(c.text.startswith('torchrun') for c in COMMANDS)
    assert not any(c.text.startswith(('tick ', 'done', 'error')) for c in COMMANDS)

def test_suggested_data_demo_is_accepted(tmp_path):
    """An error message's advice is a printed command too: where `fid.py ref` suggests --data=demo, it takes it."""
    cwd = fresh_clone(tmp_path)
    r = run_as_printed('python fid.py ref --data=datasets/missing.zip --dest=ref.npz', cwd)
    if 'use --data=demo' not in r.stderr:
        return
    try:   # accepted: it goes on to the Inception weights (offline: an error about them, not about the data)
        r = run_as_printed('TORCH_HOME=./torch-home python fid.py ref --data=demo --dest=ref.npz', cwd)
    except subprocess.TimeoutExpired:
        return
    assert 'demo: no such dataset' not in r.stderr, r.stderr
