//! The harness itself: servers start on their own ports and stores, survive kill -9 with their data,
//! and a 3-node cluster keeps an R3 stream available with one node down.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use baton_tests::{Cluster, NatsServer};

async fn js(urls: &str) -> jetstream::Context {
    let urls: Vec<&str> = urls.split(',').collect();
    jetstream::new(async_nats::connect(urls.as_slice()).await.expect("connect"))
}

#[tokio::test]
async fn a_single_node_keeps_its_data_across_kill_9_and_restart() {
    let mut server = NatsServer::start();
    let other = NatsServer::start();
    assert_ne!(server.port, other.port, "each server has its own port");
    let ctx = js(&server.url()).await;
    ctx.create_stream(stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    ctx.publish("t.a", "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        js(&other.url()).await.get_stream("T").await.is_err(),
        "servers do not share a store"
    );

    server.kill();
    assert!(!server.is_running());
    assert!(
        async_nats::connect(server.url()).await.is_err(),
        "a killed server is gone"
    );
    server.restart();
    let ctx = js(&server.url()).await;
    let mut s = ctx
        .get_stream("T")
        .await
        .expect("the stream survives kill -9");
    assert_eq!(s.info().await.unwrap().state.messages, 1);

    server.stop();
    server.restart();
    let msg = js(&server.url())
        .await
        .get_stream("T")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(msg.payload.as_ref(), b"hello");
}

#[tokio::test]
async fn a_cluster_keeps_an_r3_stream_available_with_a_node_down() {
    let mut cluster = Cluster::start();
    cluster.wait_ready().await;
    let ctx = js(&cluster.urls()).await;
    ctx.create_stream(stream::Config {
        name: "R".into(),
        subjects: vec!["r.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("an R3 stream on 3 nodes");
    ctx.publish("r.1", "one".into())
        .await
        .unwrap()
        .await
        .unwrap();

    cluster.nodes[0].kill();
    // Clients fail over to the remaining nodes; the stream keeps quorum with two of three.
    let ctx = js(&format!(
        "{},{}",
        cluster.nodes[1].url(),
        cluster.nodes[2].url()
    ))
    .await;
    let mut stored = false;
    for _ in 0..100 {
        if let Ok(ack) = ctx.publish("r.2", "two".into()).await
            && ack.await.is_ok()
        {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "publishing works with one node down");
    cluster.nodes[0].restart();
    cluster.wait_ready().await;
    let mut s = ctx.get_stream("R").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 2);
}
