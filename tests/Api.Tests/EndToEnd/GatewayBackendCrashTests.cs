using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;
using OrleansIdempotency.Api.Gateway;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// A backend that dies after reading a request, its connection closed cleanly by the kernel as a killed process's is,
/// without a byte of answer: whatever the request carried, it reaches the backend once.
/// </summary>
public sealed class GatewayBackendCrashTests : IAsyncLifetime, IDisposable
{
    private readonly TcpListener backend = new(IPAddress.Loopback, 0);
    private readonly CancellationTokenSource stopping = new();
    private readonly ConcurrentQueue<string> heads = new();
    private ApiServer? gateway;
    private Task accepting = Task.CompletedTask;
    private int requestsRead;

    public async Task InitializeAsync()
    {
        backend.Start();
        accepting = AcceptAsync();
        var address = $"http://127.0.0.1:{((IPEndPoint)backend.LocalEndpoint).Port.ToString(CultureInfo.InvariantCulture)}/";
        var settings = GatewayTests.GatewaySettings(new Uri(address), GatewayExtensions.DefaultPolicyName);
        gateway = await ApiServer.StartAsync(settings);
    }

    public async Task DisposeAsync()
    {
        if (gateway is not null)
        {
            await gateway.DisposeAsync();
        }

        await stopping.CancelAsync();
        backend.Stop();
        await accepting;
    }

    private ApiServer Gateway => gateway ?? throw new InvalidOperationException("The gateway did not start.");

    public void Dispose()
    {
        backend.Dispose();
        stopping.Dispose();
    }

    [Theory]
    [InlineData(null, false)]
    [InlineData("", false)]
    [InlineData("{\"amount\":5}", false)]
    [InlineData("{\"amount\":5}", true)]
    public async Task BackendClosingTheConnectionUnanswered_ReceivesTheRequestOnce_AndTheRetryFindsItInDoubt(string? body, bool expectContinue)
    {
        var key = Guid.NewGuid().ToString();
        Assert.Equal(200, await SendAsync("/strict/warm", Guid.NewGuid().ToString(), body, expectContinue));

        // Sent, as most requests are, on a connection an earlier one left open.
        var first = await SendAsync("/strict/charges", key, body, expectContinue);
        var retry = await SendAsync("/strict/charges", key, body, expectContinue);

        Assert.Equal(502, first);
        Assert.Equal(409, retry);
        Assert.Equal(1, Volatile.Read(ref requestsRead));
    }

    [Fact]
    public async Task RequestTheLayerDoesNotRun_GoesToTheBackendAsItCame_NoBodyAdded()
    {
        // A GET on an idempotent route passes through the layer untouched, and keeps its form.
        Assert.Equal(502, await SendAsync("/strict/status", Guid.NewGuid().ToString(), null, expectContinue: false, method: "GET"));

        // (.NET's client may send it again on a new connection: a GET is safe to resend.)
        var gets = heads.Where(head => head.StartsWith("GET /strict/status ", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(gets);
        Assert.All(gets, get => Assert.DoesNotContain("Content-Length", get, StringComparison.OrdinalIgnoreCase));
    }

    // A null body is a POST with neither Content-Length nor Transfer-Encoding: no body, by HTTP/1.1's rules. The body
    // follows the head at once, even when it says it expects 100 Continue (as a client may).
    private async Task<int> SendAsync(string path, string key, string? body, bool expectContinue, string method = "POST")
    {
        using var client = new TcpClient();
        await client.ConnectAsync(Gateway.BaseAddress.Host, Gateway.BaseAddress.Port);
        await using var stream = client.GetStream();
        var head = $"{method} {path} HTTP/1.1\r\nHost: {Gateway.BaseAddress.Authority}\r\nConnection: close\r\n" +
            $"Idempotency-Key: {key}\r\nAuthorization: Bearer caller-1\r\n" + (expectContinue ? "Expect: 100-continue\r\n" : "") +
            (body is null ? "" : $"Content-Type: application/json\r\nContent-Length: {Encoding.UTF8.GetByteCount(body)}\r\n") + "\r\n" + body;
        await stream.WriteAsync(Encoding.UTF8.GetBytes(head));
        using var response = new StreamReader(stream, Encoding.ASCII);
        while (true)
        {
            var line = await response.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30));
            Assert.True(line is not null, $"the gateway closed the connection of {path} without an answer");
            var status = int.Parse(line.Split(' ')[1], CultureInfo.InvariantCulture);
            if (status != 100)
            {
                return status;
            }

            while (!string.IsNullOrEmpty(await response.ReadLineAsync()))
            {
            }
        }
    }

    // Answers 200 to /strict/warm, keeping the connection for the next request; reads any other request and closes.
    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                using var connection = await backend.AcceptSocketAsync(stopping.Token);
                try
                {
                    while (await ReadRequestAsync(connection) is { } request && request.StartsWith("POST /strict/warm ", StringComparison.Ordinal))
                    {
                        await connection.SendAsync("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"u8.ToArray(), stopping.Token);
                    }

                    connection.Shutdown(SocketShutdown.Both);
                }
                catch (SocketException)
                {
                    // The gateway closed a connection it no longer needed.
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    // The request's head, its body read too (by its Content-Length): unread bytes would make the close a reset, not
    // the clean end of a process that read its request and died. Null when the connection ended first.
    private async Task<string?> ReadRequestAsync(Socket connection)
    {
        var received = new List<byte>();
        var buffer = new byte[4096];
        int headEnd;
        while ((headEnd = Encoding.ASCII.GetString([.. received]).IndexOf("\r\n\r\n", StringComparison.Ordinal)) < 0)
        {
            var read = await connection.ReceiveAsync(buffer, stopping.Token);
            if (read == 0)
            {
                return null;
            }

            received.AddRange(buffer.AsSpan(0, read));
        }

        var head = Encoding.ASCII.GetString([.. received], 0, headEnd);
        heads.Enqueue(head);
        var length = head.Split("\r\n").FirstOrDefault(line => line.StartsWith("Content-Length:", StringComparison.OrdinalIgnoreCase)) is { } line
            ? int.Parse(line["Content-Length:".Length..], CultureInfo.InvariantCulture)
            : 0;
        // A request expecting 100 Continue has sent no body yet: this backend dies with the head read.
        var expectsContinue = head.Contains("\r\nExpect: 100-continue", StringComparison.OrdinalIgnoreCase);
        for (var left = expectsContinue ? 0 : headEnd + 4 + length - received.Count; left > 0;)
        {
            var read = await connection.ReceiveAsync(buffer.AsMemory(0, Math.Min(left, buffer.Length)), stopping.Token);
            if (read == 0)
            {
                return null;
            }

            left -= read;
        }

        if (head.StartsWith("POST /strict/charges ", StringComparison.Ordinal))
        {
            Interlocked.Increment(ref requestsRead);
        }

        return head;
    }
}
