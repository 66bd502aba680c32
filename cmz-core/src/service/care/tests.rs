//! The CSV export and the usage groupings.

use super::*;

#[test]
fn csv_fields_are_quoted_and_never_formulas() {
    assert_eq!(csv_field("lion"), "lion");
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    assert_eq!(csv_field("-1"), "'-1");
}

#[test]
fn groupings_parse_and_unknown_names_are_refused() {
    let all: UsageGrouping = "day, family,user,animal,model".parse().unwrap();
    assert!(all.day && all.family && all.user && all.animal && all.model);
    assert_eq!(
        "".parse::<UsageGrouping>().unwrap(),
        UsageGrouping::default()
    );
    assert_eq!(
        "week".parse::<UsageGrouping>().unwrap_err().code(),
        "validation_error"
    );
}
