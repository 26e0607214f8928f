//! A mixed fleet: deflookup peers and the reference server on one shared table and channel.

use super::*;

/// What a reference server does to the shared table and channel, in plain SQL: its upsert,
/// its consumer query (one per visited module), and its DELETE followed by its payloads.
struct ReferencePeer {
    client: Client,
    channel: String,
}

impl ReferencePeer {
    async fn upsert(&self, url: &str, deps: &[String]) {
        let alias = lookup_core::urls::file_alias(url);
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, error_doc, created_at, file_alias) \
                 VALUES ($1, 'public', '', $2, '{}', $3, NULL, 1, $4) \
                 ON CONFLICT ON CONSTRAINT modules_pkey DO UPDATE SET deps = EXCLUDED.deps",
                &[&url, &REALM, &serde_json::json!(deps), &alias],
            )
            .await
            .expect("the reference's upsert");
    }

    /// The reference's invalidation of `url`: its variants, then consumers found module by
    /// module, then DELETE and one module payload (no `"o"`: the reference sends none).
    async fn invalidate(&self, url: &str) -> Vec<String> {
        let mut list = lookup_core::urls::variants(url);
        let mut next = 0;
        while next < list.len() {
            let name = list[next].clone();
            next += 1;
            let rows = self
                .client
                .query(
                    "SELECT url::text, file_alias FROM modules WHERE resolved_realm_url = $1 \
                     AND deps @> jsonb_build_array($2::text)",
                    &[&REALM, &name],
                )
                .await
                .expect("the reference's consumer query");
            for row in rows {
                for found in [row.get::<_, String>(0), row.get::<_, String>(1)] {
                    if !list.contains(&found) {
                        list.push(found);
                    }
                }
            }
        }
        self.client
            .execute(
                "DELETE FROM modules WHERE resolved_realm_url = $1 \
                 AND (url = ANY ($2) OR file_alias = ANY ($2))",
                &[&REALM, &list],
            )
            .await
            .expect("the reference's delete");
        let payload = serde_json::json!({"k": "module", "r": REALM, "m": list}).to_string();
        notify(&self.client, &self.channel, &payload).await;
        list
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_shares_rows_and_invalidations_with_the_reference_on_either_revision() {
    let Some(db) = TestDb::from_env("mixed fleet") else { return };
    for diagnostics in ["diagnostics", "timing_diagnostics"] {
        let config = shared_config(&db, "mixed_fleet");
        let schema = config.get_schema().expect("a schema").to_owned();
        // The reference set the database up first.
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}; {}",
                behaviour_suite::reference_table_ddl(diagnostics)
            ))
            .await
            .expect("the reference's table");
        let reference = ReferencePeer { client: admin, channel: config.get_channel().to_owned() };
        // The reference also listens, as its servers do, with a connection of its own.
        let (heard_client, mut heard_connection) =
            tokio_postgres::connect(&db.url, NoTls).await.expect("connect");
        let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| heard_connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(note) = message {
                    let _ = heard_tx.send(note.payload().to_owned());
                }
            }
        });
        heard_client
            .batch_execute(&format!("LISTEN \"{}\"", config.get_channel()))
            .await
            .expect("LISTEN");

        let mut ours = peer(&config).await;
        let leaf = format!("{REALM}leaf.gts");
        let card = format!("{REALM}card.gts");
        // deflookup serves the reference's row without rendering.
        reference.upsert(&leaf, &[]).await;
        ours.lookup.get_module_entry(&leaf, None).await.expect("the reference's row");
        assert_eq!(ours.renderer.total_calls(), 0, "{diagnostics}");
        // deflookup renders a consumer of it; the reference's invalidation of the leaf finds
        // deflookup's row, deletes it, and deflookup's listener hears the payload.
        ours.renderer.set(&card, FakeModule::ready(&["Card"], &[&format!("{REALM}leaf")]));
        ours.lookup.get_module_entry(&card, None).await.expect("deflookup's render");
        let list = reference.invalidate(&leaf).await;
        assert!(list.contains(&card), "{diagnostics}: the reference finds our consumer: {list:?}");
        let event = next_event(&mut ours.events, "the reference's payload").await;
        assert!(
            matches!(&event, ListenerEvent::Module { urls, .. } if urls.contains(&card)),
            "{event:?}"
        );
        assert!(ours.lookup.get_cached_entry(&card, None).await.expect("read").is_none());
        // The other way: the reference's row consumes deflookup's module; deflookup's
        // invalidation deletes it, and the reference hears a payload its parser reads.
        ours.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
        ours.lookup.get_module_entry(&leaf, None).await.expect("render");
        let user = format!("{REALM}user.gts");
        reference.upsert(&user, &[format!("{REALM}leaf")]).await;
        let invalidated = ours.lookup.invalidate(&leaf).await.expect("invalidate");
        assert!(invalidated.contains(&user), "{diagnostics}: {invalidated:?}");
        // (It first hears its own payload from above.)
        let parsed = bounded("the reference hears deflookup", async {
            loop {
                let payload = heard.recv().await.expect("payload");
                let parsed: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
                if parsed.get("o").is_some() {
                    return parsed;
                }
            }
        })
        .await;
        assert_eq!(parsed["k"], "module");
        assert!(parsed["m"].as_array().expect("m").contains(&serde_json::json!(user)));
        let left: i64 = reference
            .client
            .query_one("SELECT count(*) FROM modules WHERE url = $1", &[&user])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "{diagnostics}: the reference's consumer row is gone");
        ours.listener.shutdown().await;
    }
}
