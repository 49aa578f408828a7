"""Property tests: random models and masks against FakeSparsity (thousands: tools/property_check.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from property_models import check_properties, masks_for, models

EXAMPLES = 200  # in CI; tools/property_check.py runs thousands


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.data())
def test_transform_equals_fake_sparsity_keeps_state_and_leaves_the_model(data: st.DataObject) -> None:
    model, width = data.draw(models())
    masks = data.draw(masks_for(model))
    check_properties(model, width, masks)
