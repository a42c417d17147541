//! UTS namespaces: the host and domain names, read from inside the
//! namespace at dump (a thread of cryo's enters it) and set in the new
//! namespace the restore makes.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::UtsState;

/// The names of the UTS namespace open at `ns`.
pub fn dump(ns: OwnedFd) -> Result<UtsState, String> {
    let (hostname, domainname) =
        crate::sys::ns::uts_names(ns).map_err(|e| format!("reading its names: {e}"))?;
    Ok(UtsState {
        hostname,
        domainname,
    })
}

/// This task in a new UTS namespace with the dumped names.
pub fn restore(st: Option<&UtsState>) -> Result<(), String> {
    let st = st.ok_or("its names are not in the image")?;
    crate::sys::ns::new_uts(&st.hostname, &st.domainname)
        .map_err(|e| format!("unshare(CLONE_NEWUTS), sethostname, setdomainname: {e}"))
}
