//! Reading one value out of the Prometheus text the admin endpoint serves. Plain std, so the
//! daemon's own tests read `/metrics` with this same file (by path) without depending on the
//! tools' crate.

/// A value from a Prometheus text exposition. `name` with labels (`m{a="b"}`, as written
/// there) is that one series; a bare metric name is the sum of all its series (across
/// tenants, say). `None` when no series matches.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    let series = exposition.lines().filter(|l| !l.starts_with('#'));
    if name.contains('{') {
        return series
            .into_iter()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok());
    }
    let values: Vec<f64> = series
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
