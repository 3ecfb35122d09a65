using System.Net;
using System.Reflection;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.TestHost;
using Microsoft.Extensions.DependencyInjection;

namespace OrleansIdempotency.Api.Tests.Health;

/// <summary><c>GET /health</c> against a cluster that never answers (a stalled gateway), through a stand-in grain factory.</summary>
public sealed class ClusterHealthTests
{
    [Fact]
    public async Task ClusterThatNeverAnswers_Is503AfterTheWait_AndItsCallIsCancelled_NotLeftPending()
    {
        var management = DispatchProxy.Create<IManagementGrain, SilentManagement>();
        var grains = DispatchProxy.Create<IGrainFactory, OneGrainFactory>();
        ((OneGrainFactory)(object)grains).Management = management;
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseTestServer();
        builder.Services.AddSingleton(grains);
        await using var app = builder.Build();
        app.MapClusterHealth();
        await app.StartAsync();

        using var response = await app.GetTestClient().GetAsync(new Uri("/health", UriKind.Relative));

        Assert.Equal(HttpStatusCode.ServiceUnavailable, response.StatusCode);
        // Each probe of a stalled gateway would otherwise leave its call waiting for Orleans' own time-out.
        Assert.True(((SilentManagement)(object)management).Asked!.Value.IsCancellationRequested);
        Assert.Contains("did not answer within 5 s", await response.Content.ReadAsStringAsync(), StringComparison.Ordinal);
    }

    /// <summary>A grain factory that knows the management grain alone.</summary>
    public class OneGrainFactory : DispatchProxy
    {
        public IManagementGrain? Management { get; set; }

        protected override object? Invoke(MethodInfo? targetMethod, object?[]? args) =>
            targetMethod is { Name: nameof(IGrainFactory.GetGrain), IsGenericMethod: true } && targetMethod.GetGenericArguments()[0] == typeof(IManagementGrain)
                ? Management
                : throw new NotSupportedException(targetMethod?.Name);
    }

    /// <summary>A management grain whose hosts never come: it answers only the cancellation of the call.</summary>
    public class SilentManagement : DispatchProxy
    {
        public CancellationToken? Asked { get; private set; }

        protected override object? Invoke(MethodInfo? targetMethod, object?[]? args)
        {
            if (targetMethod?.Name != nameof(IManagementGrain.GetHosts))
            {
                throw new NotSupportedException(targetMethod?.Name);
            }

            var token = args!.OfType<CancellationToken>().SingleOrDefault();
            Asked = token;
            var hosts = new TaskCompletionSource<Dictionary<SiloAddress, SiloStatus>>();
            token.Register(() => hosts.TrySetCanceled(token));
            return hosts.Task;
        }
    }
}
