"""Byzantine attacks: their texts, and exactly what each sends in place of the honest update."""

from __future__ import annotations

import pytest
import torch

from collectives.errors import ConfigError
from peer.attacks import Attack, flip_labels, noise_seed, parse_attack

HONEST = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5], [4.0]])]


@pytest.mark.parametrize(
    "text,attack,canonical",
    [
        ("signflip", Attack("signflip", k=10.0), "signflip"),
        ("signflip,k=5", Attack("signflip", k=5.0), "signflip,k=5"),
        ("scale=3", Attack("scale", k=3.0), "scale=3"),
        ("scale,k=-2.5", Attack("scale", k=-2.5), "scale=-2.5"),
        ("noise=0.5", Attack("noise", s=0.5), "noise=0.5"),
        ("noise,s=2,seed=7", Attack("noise", s=2.0, seed=7), "noise=2,seed=7"),
        ("zero", Attack("zero"), "zero"),
        (" labelflip ", Attack("labelflip"), "labelflip"),
    ],
)
def test_attack_texts_parse_and_print_back(text, attack, canonical):
    assert parse_attack(text) == attack
    assert str(attack) == canonical
    assert parse_attack(canonical) == attack


@pytest.mark.parametrize(
    "text,message",
    [
        ("flip", "unknown attack 'flip'; write one of signflip, signflip,k=5, scale=3"),
        ("scale", "scale needs its factor, e.g. scale=3"),
        ("noise", "noise needs its standard deviation, e.g. noise=0.5"),
        ("noise=0", "noise needs a finite standard deviation above 0"),
        ("noise=-1", "noise needs a finite standard deviation above 0"),
        ("signflip,k=0", "k must be > 0"),
        ("signflip,k=-3", "k must be > 0"),
        ("scale=inf", "k must be a finite number"),
        ("scale=big", "k= needs a number, got 'big'"),
        ("signflip=3", "only scale=K and noise=S take a value; write signflip alone"),
        ("zero,k=2", "zero takes no options, not k="),
        ("signflip,s=1", "signflip takes k=, not s="),
        ("signflip,seed=1", "signflip takes k=, not seed="),
        ("noise=1,s=2", "s is given twice"),
        ("noise=1,seed=x", "seed= needs an integer, got 'x'"),
        ("noise=1,seed=-1", "seed must be an integer >= 0"),
        ("signflip,k", "cannot read 'k'; options are KEY=VALUE"),
    ],
)
def test_bad_attack_texts_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError) as info:
        parse_attack(text)
    assert message in str(info.value)


def values(tensors: list[torch.Tensor]) -> list[list]:
    return [t.tolist() for t in tensors]


def test_signflip_sends_minus_k_times_the_honest_update():
    assert values(Attack("signflip").corrupt(HONEST)) == [[-10.0, 20.0], [[-5.0], [-40.0]]]
    assert values(parse_attack("signflip,k=5").corrupt(HONEST)) == [[-5.0, 10.0], [[-2.5], [-20.0]]]


def test_scale_sends_k_times_the_honest_update():
    assert values(parse_attack("scale=3").corrupt(HONEST)) == [[3.0, -6.0], [[1.5], [12.0]]]


def test_zero_sends_zeros_of_the_same_shapes():
    sent = parse_attack("zero").corrupt(HONEST)
    assert values(sent) == [[0.0, 0.0], [[0.0], [0.0]]]
    assert [t.dtype for t in sent] == [torch.float32, torch.float32]


def test_labelflip_sends_its_honest_update_as_a_copy():
    sent = parse_attack("labelflip").corrupt(HONEST)
    assert values(sent) == values(HONEST)
    assert all(s is not h for s, h in zip(sent, HONEST))


def test_the_attacks_leave_the_honest_tensors_unchanged():
    before = values(HONEST)
    for text in ("signflip", "scale=3", "noise=1", "zero", "labelflip"):
        parse_attack(text).corrupt(HONEST)
    assert values(HONEST) == before


def test_noise_is_the_documented_seeded_gaussian_in_place_of_the_update():
    sent = parse_attack("noise=2,seed=3").corrupt(HONEST)
    gen = torch.Generator().manual_seed(noise_seed(3, 0))
    expected = [torch.randn((2,), generator=gen) * 2, torch.randn((2, 1), generator=gen) * 2]
    assert values(sent) == values(expected)


def test_noise_differs_from_call_to_call_and_repeats_for_the_same_call():
    attack = parse_attack("noise=1")
    first, second = attack.corrupt(HONEST), attack.corrupt(HONEST)
    assert values(first) != values(second)
    assert values(parse_attack("noise=1").corrupt(HONEST, call=1)) == values(second)
    assert values(parse_attack("noise=1,seed=1").corrupt(HONEST, call=0)) != values(first)


def test_noise_seeds_of_neighbouring_seeds_and_calls_differ():
    assert noise_seed(0, 0) == 0
    assert noise_seed(0, 1) == 1
    assert len({noise_seed(seed, call) for seed in range(5) for call in range(5)}) == 25


def test_what_is_sent_is_finite_even_when_the_factor_overflows_or_the_update_is_nan():
    big = torch.finfo(torch.float32).max
    sent = Attack("signflip").corrupt([torch.tensor([3e38, float("nan"), float("-inf")])])
    assert sent[0].tolist() == [-big, 0.0, big]


def test_flip_labels_maps_y_to_classes_minus_one_minus_y_and_keeps_the_inputs():
    inputs = torch.arange(6.0).reshape(3, 2)
    flipped_inputs, labels = flip_labels((inputs, torch.tensor([0, 3, 9])), classes=10)
    assert flipped_inputs is inputs
    assert labels.tolist() == [9, 6, 0]


def test_flip_labels_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) for a task of 10 classes; got 0..10"):
        flip_labels((torch.zeros(2), torch.tensor([0, 10])), classes=10)


def test_flip_labels_refuses_float_labels():
    with pytest.raises(ValueError, match="needs integer class labels"):
        flip_labels((torch.zeros(2), torch.tensor([0.0, 1.0])), classes=10)


def test_only_labelflip_poisons_the_data():
    assert [parse_attack(t).poisons_data for t in ("signflip", "scale=2", "noise=1", "zero", "labelflip")] == [
        False, False, False, False, True,
    ]


def test_an_attacks_own_flip_labels_flips_only_for_labelflip():
    batch = (torch.zeros(2), torch.tensor([1, 8]))
    assert parse_attack("labelflip").flip_labels(batch, classes=10)[1].tolist() == [8, 1]
    assert parse_attack("signflip").flip_labels(batch, classes=10) is batch
