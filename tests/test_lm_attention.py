"""Attention masks: the rules one by one. The whole mask is compared with the reference through its
observable consequence, logits on layouts with tiles longer than the window (tests/test_lm_model.py)."""

from __future__ import annotations

import pytest
import torch

from lm.attention import attention_mask, tile_ids_from_mask


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n)[None]  # (1, n)


def test_causal_without_window():
    mask = attention_mask(_positions(6), _positions(6), sliding_window=None)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_window_boundary():
    window = 4
    mask = attention_mask(_positions(10), _positions(10), sliding_window=window)[0, 0]
    q = 8
    assert mask[q, q - (window - 1)]  # q - k == window - 1: inside
    assert not mask[q, q - window]  # q - k == window: outside
    assert mask[q, q] and not mask[q, q + 1]


def test_tile_is_bidirectional_and_never_sees_a_later_tile():
    # text, tile 0 (positions 1-3), text, tile 1 (positions 5-7), text
    tiles = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 1, -1]])
    mask = attention_mask(_positions(9), _positions(9), sliding_window=None, q_tile=tiles, k_tile=tiles)[0, 0]
    assert mask[1, 3] and mask[3, 1]  # both directions inside tile 0
    assert mask[5, 7]
    assert not mask[3, 5] and not mask[1, 7]  # tile 0 never sees tile 1
    assert mask[7, 1]  # a later tile sees an earlier one causally
    assert not mask[0, 1] and not mask[4, 5]  # text before a tile does not see it
    assert not mask[2, 4]  # a tile token does not see the text after it


def test_window_also_bounds_tile_tokens_like_the_reference():
    tiles = torch.tensor([[0] * 8])
    mask = attention_mask(_positions(8), _positions(8), sliding_window=3, q_tile=tiles, k_tile=tiles)[0, 0]
    assert mask[0, 7]  # later tokens of the same tile: always
    assert mask[7, 5] and not mask[7, 4]  # earlier ones: only within the window


def test_empty_cache_cells_are_masked_out():
    k_pos = torch.tensor([[0, 1, -1, 3]])
    k_tile = torch.tensor([[-1, -1, 0, -1]])
    q_tile = torch.tensor([[0]])
    mask = attention_mask(torch.tensor([[3]]), k_pos, sliding_window=None, q_tile=q_tile, k_tile=k_tile)
    assert mask[0, 0, 0].tolist() == [True, True, False, True]


def test_tile_ids_from_mask():
    image = torch.tensor([[False, True, True, False, True, True, False], [True, True, False, False, False, False, False]])
    assert tile_ids_from_mask(image, 2).tolist() == [[-1, 0, 0, -1, 1, 1, -1], [0, 0, -1, -1, -1, -1, -1]]
    assert tile_ids_from_mask(image, 2, first_id=torch.tensor([3, 0])).tolist()[0] == [-1, 3, 3, -1, 4, 4, -1]
    adjacent = torch.tensor([[True] * 4])
    assert tile_ids_from_mask(adjacent, 2).tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize(
    "image",
    [[[True, True, True, False]], [[True, False, True, False]]],
    ids=["count not a multiple", "tile interrupted by text"],
)
def test_tile_ids_refuse_partial_tiles(image):
    with pytest.raises(ValueError, match="placeholders"):
        tile_ids_from_mask(torch.tensor(image), 2)


def test_tile_spans_from_mask_are_the_runs_tile_ids_from_mask_numbers():
    """The spans of every tile id tile_ids_from_mask gives, in order, and its errors, on random layouts."""
    from lm.attention import tile_spans_from_mask

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        pieces = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
            text, tiles = (int(n) for n in torch.randint(0, 4, (2,), generator=generator))
            pieces += [False] * text + [True] * (3 * tiles + int(torch.randint(0, 2, (1,), generator=generator)))
        mask = torch.tensor(pieces or [False], dtype=torch.bool)
        try:
            ids = tile_ids_from_mask(mask[None], 3)[0]
        except ValueError as exc:
            with pytest.raises(ValueError) as caught:
                tile_spans_from_mask(mask.numpy(), 3)
            assert str(caught.value) == str(exc)
            continue
        expected = [(int(torch.nonzero(ids == tile)[0]), int(torch.nonzero(ids == tile)[-1]) + 1)
                    for tile in range(int(ids.max()) + 1)]
        assert tile_spans_from_mask(mask.numpy(), 3) == expected
