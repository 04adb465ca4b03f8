import pytest

from llmtags.parse import MAX_TAG_CHARS, MAX_TAGS, clean_tag, parse_tags


@pytest.mark.parametrize(
    "text, tags",
    [
        ("品牌:理肤泉\n产品词:防晒霜", ["品牌:理肤泉", "产品词:防晒霜"]),
        ('["Brand:Diesel", "Color: Red"]', ["Brand:Diesel", "Color:Red"]),
        ('Tags: ["Brand:Diesel"] done', ["Brand:Diesel"]),
        ('[{"attribute": "Brand", "value": "Diesel"}]', ["Brand:Diesel"]),
        ('{"Brand": ["A", "B"], "Color": "Red"}', ["Brand:A", "Brand:B", "Color:Red"]),
        ("品牌:理肤泉，产品词:防晒霜、型号:spf50", ["品牌:理肤泉", "产品词:防晒霜", "型号:spf50"]),
        ("品牌:理肤泉; 产品词:防晒霜", ["品牌:理肤泉", "产品词:防晒霜"]),
        ("#防晒霜 #理肤泉", ["防晒霜", "理肤泉"]),
        ("1. 品牌：理肤泉\n2) 产品词：防晒霜", ["品牌:理肤泉", "产品词:防晒霜"]),
        ("1. 品牌：理肤泉 2. 产品词：防晒霜", ["品牌:理肤泉", "产品词:防晒霜"]),
        ('- "Brand": "Diesel"\n* Color: Black, Red', ["Brand:Diesel", "Color:Black, Red"]),
        ("“品牌”：“理肤泉”", ["品牌:理肤泉"]),
        ("Brand:\nColor:Red", ["Color:Red"]),  # empty value dropped
        ("Brand:Diesel\nbrand:diesel\nBrand:Diesel", ["Brand:Diesel"]),  # duplicates once
        ("Size:10.5 in", ["Size:10.5 in"]),
        # A measure keeps its inch and foot marks; quotes around a value still go.
        ('Height:36"\nWidth:1 11/16"\nLength:5\'\nBrand:"Avery"', ['Height:36"', 'Width:1 11/16"', "Length:5'", "Brand:Avery"]),
        ('"Height:36""', ['Height:36"']),
        ("Brand:Nike'", ["Brand:Nike"]),
        ("", []),
        ("  \n \n", []),
    ],
)
def test_parse_tags(text, tags):
    assert parse_tags(text) == tags


def test_bounds():
    assert len(parse_tags("\n".join(f"Tag:{i}" for i in range(500)))) == MAX_TAGS
    assert len(clean_tag("Brand:" + "x" * 1000)) == MAX_TAG_CHARS


def test_brackets_inside_values_survive():
    assert parse_tags("Size:7 UK (US Women's 9 M)\n【品牌:理肤泉】") == ["Size:7 UK (US Women's 9 M)", "品牌:理肤泉"]
