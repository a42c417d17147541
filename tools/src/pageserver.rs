//! `cryo page-server`, and the `--page-server` options of dump and
//! pre-dump.

use std::path::{Path, PathBuf};

use clap::Args;

#[derive(Args, Debug)]
pub struct PageServerArgs {
    /// Directory the images go into (each in DIR/NAME, NAME its
    /// directory's name on the source).
    #[arg(short = 'D', long = "images-dir")]
    pub dir: PathBuf,
    /// Port to listen on.
    #[arg(long)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub address: String,
    /// Go on after a dump (the last image of a chain) came; by default the
    /// server ends then.
    #[arg(long)]
    pub keep: bool,
    /// Restore a dump (the last image of a chain) as soon as it is here
    /// (cryo migrate's other end); the source learns how that went.
    #[arg(long)]
    pub restore: bool,
}

pub fn run(a: PageServerArgs) -> anyhow::Result<i32> {
    let at = cryo_engine::pageserver::address(&a.address, a.port);
    let l =
        std::net::TcpListener::bind(&at).map_err(|e| anyhow::anyhow!("listening on {at}: {e}"))?;
    tracing::info!(%at, dir = %a.dir.display(), "page server listening");
    cryo_engine::pageserver::serve(l, &a.dir, a.keep, a.restore).map_err(anyhow::Error::msg)?;
    Ok(0)
}

/// Where dump and pre-dump send their image.
#[derive(Args, Debug, Clone)]
pub struct ToPageServer {
    /// Send the image to a page server (cryo page-server on the
    /// destination) at --address and --port; the pages files do not stay
    /// here.
    #[arg(long)]
    pub page_server: bool,
    /// The page server's address.
    #[arg(long, requires = "page_server")]
    pub address: Option<String>,
    /// The page server's port.
    #[arg(long, requires = "page_server")]
    pub port: Option<u16>,
}

impl ToPageServer {
    /// Send the image in `dir` if asked (`last`: a dump, not a pre-dump).
    pub fn send(&self, dir: &Path, last: bool) -> anyhow::Result<()> {
        if !self.page_server {
            return Ok(());
        }
        let (Some(addr), Some(port)) = (&self.address, self.port) else {
            anyhow::bail!("--page-server needs --address and --port");
        };
        let at = cryo_engine::pageserver::address(addr, port);
        let (sent, _) = cryo_engine::pageserver::send(dir, &at, last)
            .map_err(|e| anyhow::anyhow!("{e} (the image stays whole in {})", dir.display()))?;
        cryo_engine::pageserver::drop_pages(dir);
        tracing::info!(%at, bytes = sent, "image sent to the page server");
        Ok(())
    }
}
