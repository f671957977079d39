"""evaluate.py's CIFAR-10 judge on fake data in the real formats (the pickles, a folder of JPEGs like the stand-in):
it scores real test images at its own test accuracy and shuffled labels at chance, and reads both formats alike."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_DIT, fake_colour_images, run, run_here, write_cifar10, write_image_folder
from model import load_dataset

EPOCHS = '--classifier_epochs=10'  # 500 fake images: 30 iterations, a few seconds


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    """500 training and 100 test images in CIFAR-10's pickles; class k is a colour (crops and flips keep it)."""
    return write_cifar10(str(tmp_path_factory.mktemp('cifar_colour')), n_per_batch=100, images=fake_colour_images)


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp('cifar_jpeg')))


def test_crop_flip_is_a_crop_of_the_padded_image_mirrored_or_not():
    from evaluate import crop_flip
    torch.manual_seed(0)
    x = torch.rand(400, 2, 8, 8)
    out, padded = crop_flip(x, pad=2), torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(2) if f else padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(hits) == 1, (i, hits)
        seen.add(hits[0])
    assert len(seen) == 50  # every offset, flipped and not


def npz_of(path, x_nchw, y):
    np.savez(path, arr_0=x_nchw.permute(0, 2, 3, 1).numpy(), arr_1=np.asarray(y))
    return path


def evaluate(npz, *args):
    """evaluate.py on an .npz of samples: (result JSON, stdout)."""
    p = run_here('evaluate.py', f'--npz={npz}', '--inception=off', *args, check=True)
    return json.load(open(os.path.splitext(npz)[0] + '_eval.json')), p.stdout


@pytest.fixture(scope='module')
def judge(pickles, tmp_path_factory):
    """The judge trained on the fake pickles (dataset cifar10: the judge comes with it), cached once."""
    path = str(tmp_path_factory.mktemp('judge') / 'classifier.pt')
    x, y = load_dataset('cifar10', pickles, train=False)
    _, out = evaluate(npz_of(str(tmp_path_factory.mktemp('npz') / 'few.npz'), x[:20], y[:20]), '--dataset=cifar10',
                      f'--data_dir={pickles}', f'--classifier_path={path}', EPOCHS)
    assert 'test accuracy on cifar10, cached at' in out and torch.load(path, weights_only=False)['dataset'] == 'cifar10'
    return path


def test_real_test_images_score_at_the_judges_test_accuracy(pickles, judge, tmp_path):
    """All test images, labelled right, as samples: the judge's own test accuracy, and the real row's numbers (the
    same images, drawn in another order); their FID-cls is a small part of uniform noise's."""
    x, y = load_dataset('cifar10', pickles, train=False)
    common = ['--dataset=cifar10', f'--data_dir={pickles}', f'--classifier_path={judge}']
    r, out = evaluate(npz_of(str(tmp_path / 'test.npz'), x, y), *common)
    row, real = r['rows'][0], r['real_test']
    assert r['judge'] == 'cifar10' and r['classifier_test_acc'] > 0.9
    assert row['acc'] == pytest.approx(r['classifier_test_acc'], abs=1e-9) and real['num_samples'] == len(x) == 100
    assert real['acc'] == pytest.approx(row['acc'], abs=1e-9) and real['fid_cls'] == pytest.approx(row['fid_cls'], abs=1e-6)
    assert 'real' in out and 'held-out cifar10 test images' in out
    noise = torch.randint(0, 256, (100, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    r_noise, _ = evaluate(npz_of(str(tmp_path / 'noise.npz'), noise, y), *common)
    assert r_noise['rows'][0]['fid_cls'] > 10 * row['fid_cls'] and r_noise['rows'][0]['acc'] < 0.5
    assert r_noise['real_test'] == real  # the floor does not depend on the samples


def test_shuffled_labels_score_near_chance(pickles, judge, tmp_path):
    x, y = load_dataset('cifar10', pickles, train=False)
    shuffled = np.random.default_rng(0).permutation(y.numpy())
    r, _ = evaluate(npz_of(str(tmp_path / 'shuffled.npz'), x, shuffled), '--dataset=cifar10', f'--data_dir={pickles}',
                    f'--classifier_path={judge}')
    assert (shuffled == y.numpy()).mean() < 0.2 and r['rows'][0]['acc'] < 0.25  # chance is 0.1
    assert r['real_test']['acc'] > 0.9  # the real row keeps its own labels


def tiny_folder_checkpoint(out):
    """An untrained class-conditional UNet for 3x32x32 whose run read a folder of images (dataset 'folder')."""
    from model import UNet
    torch.manual_seed(0)
    args = dict(in_channels=3, input_size=32, base_channels=8, channel_mult=(1, 2), attn_levels=(), n_res=1, num_classes=10)
    model = UNet(**args)
    os.makedirs(out, exist_ok=True)
    torch.save(dict(model_args=args, model=model.state_dict(), ema=model.state_dict(), config={'dataset': 'folder'}),
               os.path.join(out, 'ckpt.pt'))
    return out


def test_a_folder_trained_model_names_the_judge_of_jpeg_folders(pickles, jpegs, tmp_path):
    """A checkpoint of dataset 'folder' gets no judge by itself; --judge=cifar10 --judge_data_dir=DIR trains one on
    DIR/train and DIR/test, whose folder names give CIFAR-10's label order: it knows the pickles' test images too."""
    out, clf = tiny_folder_checkpoint(str(tmp_path / 'run')), str(tmp_path / 'clf.pt')
    common = [f'--out_dir={out}', f'--data_dir={jpegs}/train', '--num_samples=100', '--steps=1', '--inception=off']
    p = run_here('evaluate.py', *common, f'--out_json={tmp_path / "none.json"}', check=True)
    r = json.load(open(tmp_path / 'none.json'))
    assert 'no classifier metrics for folder' in p.stdout and '--judge=cifar10' in p.stdout
    assert r['judge'] is None and r['rows'][0]['fid_cls'] is None and r['real_test'] is None
    run_here('evaluate.py', *common, '--judge=cifar10', f'--judge_data_dir={jpegs}', f'--classifier_path={clf}', EPOCHS,
             f'--out_json={tmp_path / "judged.json"}', check=True)
    r = json.load(open(tmp_path / 'judged.json'))
    assert r['classifier_test_acc'] > 0.9 and r['real_test']['acc'] > 0.9 and r['real_test']['num_samples'] == 100
    assert 0 <= r['rows'][0]['acc'] <= 1 and r['rows'][0]['fid_cls'] > 100 * r['real_test']['fid_cls']  # untrained
    x, y = load_dataset('cifar10', pickles, train=False)  # the other format, same labels
    r, _ = evaluate(npz_of(str(tmp_path / 'pickled.npz'), x, y), '--judge=cifar10', f'--judge_data_dir={jpegs}',
                    f'--classifier_path={clf}')
    assert r['rows'][0]['acc'] > 0.9 and r['dataset'] == 'cifar10'  # an npz named by its judge, not 'mnist'


def one_line_error(p, msg):
    assert p.returncode != 0 and msg in p.stderr and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr, p.stderr


@pytest.mark.parametrize('case,msg', [
    ('empty', 'no cifar-10-batches-py/ and no train/ class folders in'),
    ('names', "holds the class folders class0, class1"),
    ('few', 'needs at least 128 training images, found 100'),
    ('other', "is a classifier of 'mnist', not 'cifar10'"),
    ('unknown', 'unknown judge'),
    ('grey', 'the cifar10 judge reads 3-channel images, these samples have 1'),
])
def test_cifar_judge_bad_input(case, msg, pickles, tmp_path):
    x, y = fake_colour_images(8, 32, 3)
    npz = npz_of(str(tmp_path / 's.npz'), torch.from_numpy(x), y)
    args, clf = ['--judge=cifar10', f'--judge_data_dir={pickles}'], tmp_path / 'clf.pt'
    if case == 'empty':
        args[1] = f'--judge_data_dir={tmp_path}'
    elif case == 'names':
        args[1] = f'--judge_data_dir={write_image_folder(str(tmp_path / "jpg"), [f"class{k}" for k in range(10)], 10, 10)}'
    elif case == 'few':
        args[1] = f'--judge_data_dir={write_cifar10(str(tmp_path / "few"), n_per_batch=20)}'
    elif case == 'other':
        torch.save(dict(dataset='mnist'), clf)
    elif case == 'unknown':
        args[0] = '--judge=imagenet'
    elif case == 'grey':
        npz = npz_of(str(tmp_path / 's.npz'), torch.from_numpy(x[:, :1]), y)
    one_line_error(run_here('evaluate.py', f'--npz={npz}', *args, f'--classifier_path={clf}', '--inception=off'), msg)
    assert not os.path.exists(tmp_path / 's_eval.json') and (case == 'other') == os.path.exists(clf)


def test_train_dit_on_a_jpeg_folder_is_judged_by_the_cifar10_judge(jpegs, judge, tmp_path):
    """train_dit.py on the stand-in's layout, --judge=cifar10: every evaluation is a row of eval.jsonl, scored by the
    cached judge (the same numbers evaluate.py gives by hand on the final weights)."""
    out = str(tmp_path / 'dit')
    run('train_dit.py', '--dataset=folder', f'--data_dir={jpegs}/train', f'--out_dir={out}', '--batch_size=16',
        '--max_iters=4', '--eval_interval=2', '--eval_samples=20', '--judge=cifar10', f'--judge_data_dir={jpegs}',
        f'--classifier_path={judge}', '--patch_size=4', '--sample_interval=0', *TINY_DIT)
    rows = [json.loads(line) for line in open(os.path.join(out, 'eval.jsonl'))]
    assert [r['iter'] for r in rows] == [2, 4] and all(0 <= r['acc'] <= 1 and r['fid_cls'] > 0 for r in rows)
    by_hand = str(tmp_path / 'by_hand.json')
    run_here('evaluate.py', f'--ckpt={os.path.join(out, "ckpt.pt")}', f'--data_dir={jpegs}/train', '--num_samples=20',
             '--cfg=2.0', '--steps=2', '--inception=off', '--judge=cifar10', f'--judge_data_dir={jpegs}',
             f'--classifier_path={judge}', f'--out_json={by_hand}', check=True)
    r = json.load(open(by_hand))['rows'][0]
    assert (r['acc'], round(r['fid_cls'], 6)) == (rows[1]['acc'], round(rows[1]['fid_cls'], 6))
