from importlib.metadata import version

import persian_qlora


def test_public_api_resolves_and_version_is_single_sourced():
    for name in persian_qlora.__all__:
        assert getattr(persian_qlora, name) is not None, name
    assert persian_qlora.__version__ == version("persian-qlora")
