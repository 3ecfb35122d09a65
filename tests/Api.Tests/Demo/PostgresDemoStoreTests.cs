using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging.Abstractions;
using Npgsql;
using OrleansIdempotency.Api.Demo;

namespace OrleansIdempotency.Api.Tests.Demo;

public sealed class PostgresDemoStoreTests
{
    [Fact]
    public async Task StartAgainstAServerThatNeverAnswers_GivesUpAfterItsTime_NotAfterSixtyConnectTimeouts()
    {
        // Each attempt waits its whole connect time-out: counted in attempts, the API did not listen for 16 minutes.
        using var silent = new TcpListener(IPAddress.Loopback, 0);
        silent.Start();
        var port = ((IPEndPoint)silent.LocalEndpoint).Port;
        await using var dataSource = NpgsqlDataSource.Create($"Host=127.0.0.1;Port={port};Username=demo;Timeout=2");
        var store = new PostgresDemoStore(dataSource, NullLogger<PostgresDemoStore>.Instance) { StartupTimeout = TimeSpan.FromSeconds(3) };

        await Assert.ThrowsAsync<NpgsqlException>(() => store.StartAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(20)));
    }
}
