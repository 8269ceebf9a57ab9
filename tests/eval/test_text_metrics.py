"""Metrics on generated text: normalisation may drop case, punctuation and articles, but never
change a number's value or sign."""

import pytest

from lm.eval import text_metrics as tm


@pytest.mark.parametrize('prediction, reference, score', [
    ('-18', '18', 0.0),  # the sign is the answer
    ('1.8', '18', 0.0),  # so is the decimal point
    ('18.', '18', 100.0),  # a full stop after a number is punctuation
    ('$1,200.00', '1200', 100.0),  # the same value written another way
    ('1.50', '1.5', 100.0),
    ('The answer is -3.', 'answer is -3', 100.0),
    ('The answer is 3.', 'answer is -3', 0.0),
    ('state-of-the-art', 'state of the art', 0.0),  # words keep SQuAD's rule: 'stateoftheart'
    ('3-4', '3 4', 100.0),  # a hyphen between numbers is not a sign
])
def test_exact_match_never_changes_a_numbers_value(prediction, reference, score):
  assert tm.exact_match([prediction], [reference]) == score


def test_token_f1_counts_a_signed_number_as_another_token():
  assert tm.token_f1(['-18 apples'], ['18 apples']) == 50.0
  assert tm.token_f1(['18 apples'], ['18 apples.']) == 100.0


def test_normalize_number_is_exact():
  assert tm.normalize_number('$1,200.00') == '1200' and tm.normalize_number('-3.50') == '-3.5'
  assert tm.normalize_number('12345678901234567890.5') == '12345678901234567890.5'
