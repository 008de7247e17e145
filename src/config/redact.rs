//! Masking passwords in database URLs before anything prints them.

/// The database URL with every password masked: `user:password@` and `password=` parameters.
/// Anything that is not a `scheme://` URL is not echoed at all.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return "<redacted: not a URL>".into() };
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let (authority_and_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    // The userinfo ends at the *last* '@' before the path (a password may contain '@').
    let path_start = authority_and_path.find('/').unwrap_or(authority_and_path.len());
    let authority = &authority_and_path[..path_start];
    let path = &authority_and_path[path_start..];
    let authority = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
            format!("{masked}{}", &authority[at..])
        }
        None => authority.to_string(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}
